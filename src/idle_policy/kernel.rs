//! How a history's counts are smoothed before a plan reads them: each count spread
//! evenly over a kernel around its bin — none for idle times that repeat exactly, wider
//! (growing with the idle time) for ones that scatter — the kernel chosen per history by
//! leave-one-out likelihood.

use super::plan::PRIOR;

/// How far a count in bin `k` is spread: `fixed` bins, and `relative × k` more.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Kernel {
    fixed: usize,
    relative: f64,
}

impl Kernel {
    fn width(&self, k: usize) -> usize {
        self.fixed + (self.relative * k as f64).round() as usize
    }
}

/// `counts` spread evenly over the kernel's width on each side (within `1..len`).
pub(super) fn smooth(counts: &[f64], kernel: Kernel) -> Vec<f64> {
    let bins = counts.len();
    let mut p = vec![0.0; bins];
    for (k, &c) in counts.iter().enumerate().skip(1).filter(|(_, c)| **c > 0.0) {
        let width = kernel.width(k);
        let (lo, hi) = (k.saturating_sub(width).max(1), (k + width).min(bins - 1));
        let share = c / (2 * width + 1) as f64;
        for slot in &mut p[lo..=hi] {
            *slot += share;
        }
    }
    p
}

/// The kernels a history may be smoothed with: none (idle times that repeat exactly),
/// and spreads growing with the idle time (a 100-bin idle time says little about 101).
const KERNELS: [Kernel; 9] = [
    Kernel {
        fixed: 0,
        relative: 0.0,
    },
    Kernel {
        fixed: 0,
        relative: 0.05,
    },
    Kernel {
        fixed: 0,
        relative: 0.1,
    },
    Kernel {
        fixed: 0,
        relative: 0.2,
    },
    Kernel {
        fixed: 0,
        relative: 0.3,
    },
    Kernel {
        fixed: 0,
        relative: 0.5,
    },
    Kernel {
        fixed: 1,
        relative: 0.1,
    },
    Kernel {
        fixed: 1,
        relative: 0.2,
    },
    Kernel {
        fixed: 2,
        relative: 0.3,
    },
];

/// The kernel under which each recorded idle period is best predicted by the others
/// (leave-one-out likelihood): none for a target whose idle times repeat exactly, wider
/// for one whose idle times scatter.
pub(super) fn best_kernel(counts: &[f64]) -> Kernel {
    // What a held-out idle time no other one predicts still gets: the prior's share.
    let floor = PRIOR / counts.len() as f64;
    let score = |kernel: &Kernel| -> f64 {
        let p = smooth(counts, *kernel);
        counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0.0)
            .map(|(k, &c)| c * ((p[k] - 1.0 / (2 * kernel.width(k) + 1) as f64).max(0.0) + floor).ln())
            .sum()
    };
    let mut best = (f64::NEG_INFINITY, KERNELS[0]);
    for kernel in KERNELS {
        let s = score(&kernel);
        if s > best.0 {
            best = (s, kernel);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeating_idle_times_are_not_smoothed_and_scattered_ones_are() {
        let mut repeating = vec![0.0; 120];
        repeating[29] = 8.0;
        assert_eq!(best_kernel(&repeating).width(29), 0);
        let mut scattered = vec![0.0; 120];
        for k in [20, 26, 31, 37, 44, 52] {
            scattered[k] = 1.0;
        }
        assert!(best_kernel(&scattered).width(30) > 0, "{:?}", best_kernel(&scattered));
    }

    #[test]
    fn smoothing_keeps_counts_inside_the_bins() {
        let mut counts = vec![0.0; 10];
        counts[5] = 3.0;
        let p = smooth(
            &counts,
            Kernel {
                fixed: 1,
                relative: 0.0,
            },
        );
        assert_eq!(&p[4..7], &[1.0, 1.0, 1.0]);
        assert_eq!(p.iter().sum::<f64>(), 3.0);
    }
}
