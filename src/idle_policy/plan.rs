//! A plan: after a target's last arrival, the windows in which it is up — the first one
//! from that arrival (the keep-alive), the others started ahead of an expected event
//! (pre-warms) — and what that means at any moment ([`Plan::step`]).
//!
//! The adaptive plan is chosen greedily, one window at a time, from the history's
//! distribution of idle periods (its counts, each spread over its neighbouring bins,
//! plus one idle period of unknown length — so a short history claims little):
//!
//! - `P(k)`: the chance that the next event ends bin `k` of the gap, and `S(k)` that it
//!   comes in bin `k` or later (including beyond the range).
//! - Being up through bin `k` saves `P(k)` cold starts and costs one bin of running time
//!   for every event not come yet, `S(k)`. With `λ = bin / cold_start_cost` (what a bin
//!   of running is worth in cold starts), its gain is `m(k) = P(k) − λ·S(k)`; a window
//!   `(a, b]` is worth the sum of `m` over `a..b` — less, for a pre-warm, the running
//!   time of its lead (the cold start plus a margin) while no event comes.
//! - From the end of the minimum keep-alive: keep running to the best `b`, or stop and
//!   pre-warm for the best `(a, b]` — whichever is worth more, if anything is — then
//!   decide again from `b`. Each step is linear in the bins (prefix sums, suffix maxima).
//!
//! Conditioning on "no event yet" divides every `P` and `S` by the same number, so the
//! later decisions need no renormalising.

use std::time::Duration;

use super::kernel::{best_kernel, smooth};
use super::{History, Settings};

/// A period in which the target is up, as offsets from its last arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// When to start it (0: it is still up from the activity).
    pub start: Duration,
    /// When it must be ready: `start` plus the cold start and a margin.
    pub ready: Duration,
    /// When to scale it down again if no event came (an event at exactly this time is
    /// still served).
    pub until: Duration,
}

/// What the plan says at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Stay (or be) up until this offset.
    Up {
        /// When the current window ends.
        until: Duration,
    },
    /// Be down; start again for `next` if there is one.
    Down {
        /// The next window.
        next: Option<Window>,
    },
}

/// The windows a target is up in after its last activity (see the module header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    windows: Vec<Window>,
    learned: bool,
}

/// One idle period of unknown length, added to every history: a history of two short
/// gaps does not mean the next one is short for sure.
pub(super) const PRIOR: f64 = 1.0;

impl Plan {
    /// The fixed idle timeout: up until `idle_timeout` after the last activity (the
    /// owner counts it from the end of the last request, as it always has).
    pub fn fixed(idle_timeout: Duration) -> Plan {
        Plan {
            windows: vec![Window {
                start: Duration::ZERO,
                ready: Duration::ZERO,
                until: idle_timeout,
            }],
            learned: false,
        }
    }

    /// The adaptive plan for `history`, with pre-warms started `lead` ahead (the
    /// target's cold start plus a margin). Without a usable history — none, recorded
    /// with another bin width, or fewer than `min_samples` idle periods — the fixed
    /// `fallback` timeout.
    pub fn adaptive(history: Option<&History>, settings: &Settings, lead: Duration, fallback: Duration) -> Plan {
        match history {
            Some(h) if h.bin() == settings.bin && h.samples() >= settings.min_samples => {
                let windows = Chooser::new(h, settings, lead).windows();
                Plan { windows, learned: true }
            }
            _ => Plan::fixed(fallback),
        }
    }

    /// Whether the plan comes from the history (not the fixed fallback).
    pub fn is_learned(&self) -> bool {
        self.learned
    }

    /// The windows, in order; the first starts at 0.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// How long the target stays up after its last arrival before its first scale-down.
    pub fn keep_alive(&self) -> Duration {
        self.windows[0].until
    }

    /// What the plan says `elapsed` after the last arrival.
    pub fn step(&self, elapsed: Duration) -> Step {
        match self.windows.iter().find(|w| w.until > elapsed) {
            Some(w) if w.start <= elapsed => Step::Up { until: w.until },
            next => Step::Down { next: next.copied() },
        }
    }
}

/// The arithmetic of one adaptive plan (see the module header); every index is a bin.
struct Chooser {
    /// Prefix sums of the gain: `gain[b] - gain[a]` is the worth of being up over `a..b`.
    gain: Vec<f64>,
    /// For each bin, the best end at or after it: `(gain, bin)`.
    best_end: Vec<(f64, usize)>,
    /// `S(k)`, and its prefix sums, for what a pre-warm's lead costs.
    later: Vec<f64>,
    later_sum: Vec<f64>,
    lambda: f64,
    lead: f64,
    /// The first bin no window reaches past.
    last: usize,
    /// The end of the minimum keep-alive.
    first: usize,
    bin: Duration,
}

impl Chooser {
    fn new(history: &History, settings: &Settings, lead: Duration) -> Chooser {
        let bins = settings.bins() as usize;
        let (counts, beyond) = history.dense(settings.bins());
        // Each count spread over its bin and the two next to it: an idle time seen at
        // 14 bins says 13 and 15 are likely too.
        let p = smooth(&counts, best_kernel(&counts));
        let total = p.iter().sum::<f64>() + beyond + PRIOR;
        let mut later = vec![0.0; bins + 1];
        later[bins] = (beyond + PRIOR) / total;
        for k in (0..bins).rev() {
            later[k] = later[k + 1] + p[k] / total;
        }
        let lambda = settings.bin.as_secs_f64() / settings.cold_start_cost.as_secs_f64();
        let mut gain = vec![0.0; bins + 1];
        let mut later_sum = vec![0.0; bins + 1];
        for k in 0..bins {
            gain[k + 1] = gain[k] + p[k] / total - lambda * later[k];
            later_sum[k + 1] = later_sum[k] + later[k];
        }
        let last = (settings.in_bins(settings.max_keep_alive).floor() as usize).clamp(1, bins);
        let mut best_end = vec![(f64::NEG_INFINITY, last); last + 2];
        for b in (0..=last).rev() {
            best_end[b] = if gain[b] >= best_end[b + 1].0 {
                (gain[b], b)
            } else {
                best_end[b + 1]
            };
        }
        let first = (settings.in_bins(settings.min_keep_alive).ceil() as usize).clamp(1, last);
        Chooser {
            gain,
            best_end,
            later,
            later_sum,
            lambda,
            lead: settings.in_bins(lead),
            last,
            first,
            bin: settings.bin,
        }
    }

    /// `sum S(k)` over `[0, t)`, for a fractional `t`.
    fn later_until(&self, t: f64) -> f64 {
        let whole = (t.floor() as usize).min(self.later.len() - 1);
        self.later_sum[whole] + (t - whole as f64) * self.later[whole]
    }

    /// The best window from `x` (the target up, no event yet): `(worth, ready, until)`,
    /// `ready == x` meaning "keep running".
    fn best_from(&self, x: usize) -> Option<(f64, usize, usize)> {
        let (end_gain, b) = self.best_end[x + 1];
        let mut best = (end_gain - self.gain[x], x, b);
        // Stop now, start again at `a - lead`: only for `a` far enough that the target
        // would be down for a while.
        let first_prewarm = (x as f64 + self.lead).floor() as usize + 1;
        for a in first_prewarm..self.last {
            let (end_gain, b) = self.best_end[a + 1];
            let lead_cost = self.lambda * (self.later_sum[a] - self.later_until(a as f64 - self.lead));
            let worth = end_gain - self.gain[a] - lead_cost;
            if worth > best.0 {
                best = (worth, a, b);
            }
        }
        (best.0 > 0.0).then_some(best)
    }

    fn windows(&self) -> Vec<Window> {
        let at = |bins: f64| self.bin.mul_f64(bins.max(0.0));
        let mut windows = vec![Window {
            start: Duration::ZERO,
            ready: Duration::ZERO,
            until: at(self.first as f64),
        }];
        let mut x = self.first;
        while x < self.last {
            let Some((_, ready, until)) = self.best_from(x) else {
                break;
            };
            if ready == x {
                windows.last_mut().expect("the keep-alive window").until = at(until as f64);
            } else {
                windows.push(Window {
                    start: at(ready as f64 - self.lead),
                    ready: at(ready as f64),
                    until: at(until as f64),
                });
            }
            x = until;
        }
        windows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    /// One-second bins, a 3 s cold start.
    fn settings() -> Settings {
        Settings {
            bin: SEC,
            range: SEC * 240,
            min_keep_alive: SEC,
            max_keep_alive: SEC * 240,
            cold_start_cost: SEC * 80,
            min_samples: 3,
        }
    }

    fn history(gaps: &[u64]) -> History {
        let mut h = History::new(SEC);
        for gap in gaps {
            h.record(SEC * *gap as u32, &settings());
        }
        h
    }

    fn plan(gaps: &[u64]) -> Plan {
        Plan::adaptive(Some(&history(gaps)), &settings(), SEC * 3, SEC * 10)
    }

    #[test]
    fn too_little_history_is_the_fixed_timeout() {
        assert_eq!(plan(&[]), Plan::fixed(SEC * 10));
        assert_eq!(plan(&[30, 30]), Plan::fixed(SEC * 10));
        let other_bin = Plan::adaptive(Some(&History::new(SEC * 2)), &settings(), SEC, SEC * 10);
        assert!(!other_bin.is_learned());
    }

    #[test]
    fn a_periodic_target_is_stopped_at_once_and_started_just_before_its_next_event() {
        // One event every 30 s: gaps of 30 s (bin 29).
        let plan = plan(&[30; 8]);
        assert!(plan.is_learned());
        assert_eq!(plan.keep_alive(), SEC, "scaled down after the minimum keep-alive");
        let prewarm = plan.windows()[1];
        assert!(prewarm.ready <= SEC * 29, "{prewarm:?}");
        assert!(prewarm.until >= SEC * 30, "{prewarm:?}");
        assert_eq!(prewarm.ready - prewarm.start, SEC * 3, "started a cold start ahead");
        assert!(
            prewarm.until - prewarm.ready <= SEC * 3,
            "and not kept long: {prewarm:?}"
        );
        assert_eq!(plan.step(SEC * 10), Step::Down { next: Some(prewarm) });
        assert_eq!(plan.step(prewarm.start), Step::Up { until: prewarm.until });
    }

    #[test]
    fn a_busy_target_is_kept_up() {
        // Gaps of a few seconds: the next event is always near, so it stays up.
        let plan = plan(&[2, 3, 2, 4, 3, 2, 5, 3, 2, 3]);
        assert!(plan.keep_alive() >= SEC * 6, "{plan:?}");
        assert_eq!(plan.windows().len(), 1);
    }

    #[test]
    fn a_target_whose_idle_times_tell_nothing_is_scaled_down_soon() {
        // Idle times beyond the range: nothing to wait for.
        let plan = plan(&[1000; 10]);
        assert_eq!(
            plan.windows(),
            &[Window {
                start: Duration::ZERO,
                ready: Duration::ZERO,
                until: SEC
            }]
        );
    }

    #[test]
    fn windows_stay_within_the_keep_alive_bounds() {
        let bounded = Settings {
            min_keep_alive: SEC * 5,
            max_keep_alive: SEC * 20,
            ..settings()
        };
        let plan = Plan::adaptive(Some(&history(&[30; 8])), &bounded, SEC * 3, SEC * 10);
        assert_eq!(plan.windows().len(), 1, "the period is beyond max_keep_alive: {plan:?}");
        assert_eq!(plan.keep_alive(), SEC * 5);
        let busy = Plan::adaptive(Some(&history(&[2, 3, 2, 4, 3, 2, 5, 3])), &bounded, SEC, SEC * 10);
        assert!(busy.windows().iter().all(|w| w.until <= SEC * 20));
    }

    #[test]
    fn step_follows_the_windows_and_an_event_at_the_end_is_served() {
        let plan = Plan {
            windows: vec![
                Window {
                    start: Duration::ZERO,
                    ready: Duration::ZERO,
                    until: SEC * 2,
                },
                Window {
                    start: SEC * 7,
                    ready: SEC * 10,
                    until: SEC * 12,
                },
            ],
            learned: true,
        };
        assert_eq!(plan.step(SEC), Step::Up { until: SEC * 2 });
        assert_eq!(
            plan.step(SEC * 2),
            Step::Down {
                next: Some(plan.windows()[1])
            }
        );
        assert_eq!(plan.step(SEC * 8), Step::Up { until: SEC * 12 });
        assert_eq!(plan.step(SEC * 12), Step::Down { next: None });
        assert_eq!(Plan::fixed(SEC * 10).step(SEC * 10), Step::Down { next: None });
    }

    #[test]
    fn a_dearer_cold_start_buys_more_running_time() {
        let gaps = [5, 40, 7, 90, 12, 5, 60, 8, 30, 6];
        let cheap_settings = Settings {
            cold_start_cost: SEC * 5,
            ..settings()
        };
        let cheap = Plan::adaptive(Some(&history(&gaps)), &cheap_settings, SEC * 3, SEC * 10);
        let dear_settings = Settings {
            cold_start_cost: SEC * 200,
            ..settings()
        };
        let dear = Plan::adaptive(Some(&history(&gaps)), &dear_settings, SEC * 3, SEC * 10);
        let up = |p: &Plan| p.windows().iter().map(|w| w.until - w.start).sum::<Duration>();
        assert!(up(&dear) > up(&cheap), "{cheap:?} vs {dear:?}");
    }
}
