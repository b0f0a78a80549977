//! Rejected bursts as a person reads them in the log: the first refusal after a quiet
//! spell is one INFO line at once (`reason=Rejected`, the VM, the code, the status);
//! the refusals that follow are counted and summed up in one line per [`WINDOW`] while
//! they go on. A flood of 503s is a handful of lines, not one per event. Bounded: one
//! timer task per VM, only while a burst lasts.

use std::sync::Mutex;
use std::time::Duration;

use super::Gate;
use crate::metrics::RejectReason;

/// How often a burst that goes on is summed up.
pub(super) const WINDOW: Duration = Duration::from_secs(10);

/// The burst in progress, if any: refusals since its last line, by reason.
#[derive(Default)]
pub(super) struct Rejections(Mutex<Option<[u64; RejectReason::ALL.len()]>>);

impl Gate {
    /// A request to this VM was refused with `status` for `reason` (never reaching the
    /// guest): logged at once if it begins a burst, else counted for the burst's next line.
    pub fn log_rejection(&self, reason: RejectReason, status: u16) {
        let index = RejectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        let mut burst = self.0.rejections.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counts) = burst.as_mut() {
            counts[index] += 1;
            return;
        }
        *burst = Some([0; RejectReason::ALL.len()]);
        drop(burst);
        tracing::info!(vm = %self.key(), reason = "Rejected", code = reason.as_str(), status, "rejecting events: {status} {}", reason.as_str());
        let gate = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(WINDOW).await;
                if !gate.sum_up_rejections() {
                    return;
                }
            }
        });
    }

    /// Logs the refusals of the last window; `false` (and the burst over) when there
    /// were none.
    fn sum_up_rejections(&self) -> bool {
        let mut burst = self.0.rejections.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(counts) = burst.as_mut() else {
            return false;
        };
        let total: u64 = counts.iter().sum();
        if total == 0 {
            *burst = None;
            return false;
        }
        let by_reason: Vec<String> = RejectReason::ALL
            .iter()
            .zip(counts.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(reason, n)| format!("{}: {n}", reason.as_str()))
            .collect();
        *counts = [0; RejectReason::ALL.len()];
        drop(burst);
        tracing::info!(
            vm = %self.key(),
            reason = "Rejected",
            count = total,
            "{total} more event(s) rejected in the last {} s ({})",
            WINDOW.as_secs(),
            by_reason.join(", ")
        );
        true
    }

    /// Whether a burst of refusals is in progress (tests).
    #[cfg(test)]
    pub(super) fn rejecting(&self) -> bool {
        self.0.rejections.0.lock().unwrap().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::gate::tests::gate_with;
    use crate::vm::Policy;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_one_line_then_one_per_window_and_ends_when_quiet() {
        let (gate, _tx) = gate_with(Policy::default());
        assert!(!gate.rejecting());
        gate.log_rejection(RejectReason::BufferFull, 503);
        assert!(gate.rejecting(), "the first refusal begins a burst");
        for _ in 0..500 {
            gate.log_rejection(RejectReason::BufferFull, 503);
        }
        gate.log_rejection(RejectReason::StartTimeout, 503);
        assert_eq!(
            gate.0.rejections.0.lock().unwrap().unwrap().iter().sum::<u64>(),
            501,
            "counted, not logged"
        );
        tokio::time::sleep(WINDOW + Duration::from_millis(1)).await;
        assert!(gate.rejecting(), "summed up, still in a burst");
        assert_eq!(gate.0.rejections.0.lock().unwrap().unwrap().iter().sum::<u64>(), 0);
        tokio::time::sleep(WINDOW).await;
        assert!(!gate.rejecting(), "a quiet window ends it");
    }
}
