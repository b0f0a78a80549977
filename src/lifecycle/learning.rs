//! What this replica has learned of a VM's idle times, for the adaptive idle policy: the
//! history stored on the target (adopted from its annotation or file), the idle periods
//! seen here since they were last handed to the backend, and the decision the owner made
//! from them (shown in `/v1/vms`).
//!
//! Arrivals record idle periods on any path, the warm one included; the owner plans from
//! the whole and hands it over with each idle scale-down. It lives in the VM's handle, so
//! it outlives owners: a stopped VM's owner ends, its learning does not.
//!
//! Replicas: each adds only the idle periods it saw; a stored history is adopted when it
//! is newer (its last activity later) than the one held, and what this replica saw since
//! its last hand-over is added on top — so a peer's write never erases it.

use std::time::{Duration, SystemTime};

use crate::idle_policy::{History, IdlePolicy, Settings};

/// The adaptive policy's current decision for a VM, for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleDecision {
    /// The policy in force.
    pub policy: IdlePolicy,
    /// Whether the plan comes from the history (not the fixed fallback).
    pub learned: bool,
    /// Idle periods in the history.
    pub samples: u32,
    /// How long the VM stays up after its last activity before the first scale-down.
    pub keep_alive: Duration,
    /// When the VM will be started ahead of its next expected event, if it will.
    pub next_prewarm: Option<SystemTime>,
}

/// What a replica has learned of one VM (see the module header).
pub(super) struct Learning {
    settings: Settings,
    /// The last stored history adopted.
    stored: Option<History>,
    /// Idle periods seen here since they were last handed over.
    unwritten: History,
    /// Bumped on every change, so a plan is made once per version.
    version: u64,
    /// The owner's last decision.
    decision: Option<IdleDecision>,
}

impl Learning {
    pub(super) fn new(settings: Settings, stored: Option<&History>) -> Learning {
        let mut learning = Learning {
            settings,
            stored: None,
            unwritten: History::new(settings.bin),
            version: 0,
            decision: None,
        };
        if let Some(stored) = stored {
            learning.adopt(stored);
        }
        learning
    }

    /// Takes a stored history if it is newer than the one held (a peer's scale-down, or
    /// the first one seen). A history of another bin width is not used: the fixed
    /// timeout applies until this replica writes one of the configured width.
    pub(super) fn adopt(&mut self, stored: &History) {
        if stored.bin() != self.settings.bin {
            return;
        }
        let newer = match &self.stored {
            None => true,
            Some(held) => stored.last_activity() > held.last_activity(),
        };
        if newer {
            self.stored = Some(stored.clone());
            self.version += 1;
        }
    }

    /// Records the gap between the last arrival and this one. Returns
    /// whether it was an idle period (longer than one bin).
    pub(super) fn record(&mut self, gap: Duration) -> bool {
        let counted = self.unwritten.record(gap, &self.settings);
        if counted {
            self.version += 1;
        }
        counted
    }

    /// Everything known: the stored history and the idle periods seen here since.
    pub(super) fn history(&self) -> History {
        let mut history = self.stored.clone().unwrap_or_else(|| History::new(self.settings.bin));
        history.merge(&self.unwritten);
        history
    }

    /// The whole history was handed to the backend (to be written with this scale-down):
    /// it is the stored one from now on.
    pub(super) fn handed_over(&mut self, history: History) {
        self.stored = Some(history);
        self.unwritten = History::new(self.settings.bin);
        self.version += 1;
    }

    /// The last arrival, as the stored history says.
    pub(super) fn stored_activity(&self) -> Option<SystemTime> {
        self.stored.as_ref().and_then(History::last_activity)
    }

    /// The cold start the stored history measured, for a replica that has not measured one.
    pub(super) fn stored_cold_start(&self) -> Option<Duration> {
        self.stored.as_ref().and_then(History::cold_start)
    }

    pub(super) fn version(&self) -> u64 {
        self.version
    }

    pub(super) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(super) fn decision(&self) -> Option<IdleDecision> {
        self.decision.clone()
    }

    pub(super) fn set_decision(&mut self, decision: IdleDecision) {
        self.decision = Some(decision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn stored(at_secs: u64, gaps: &[u32]) -> History {
        let mut h = History::new(MIN);
        for gap in gaps {
            h.record(MIN * *gap, &Settings::default());
        }
        h.set_last_activity(SystemTime::UNIX_EPOCH + Duration::from_secs(at_secs));
        h
    }

    #[test]
    fn a_peer_s_newer_history_is_adopted_and_what_was_seen_here_stays() {
        let mut learning = Learning::new(Settings::default(), Some(&stored(100, &[5])));
        assert!(learning.record(MIN * 30));
        assert!(!learning.record(Duration::from_secs(30)), "within the activity period");
        assert_eq!(learning.history().samples(), 2);
        // An older stored history (a write reaching this replica late) is not taken.
        learning.adopt(&stored(50, &[]));
        assert_eq!(learning.history().samples(), 2);
        // A peer's scale-down wrote what it saw: taken, and ours added on top.
        learning.adopt(&stored(200, &[5, 9, 9]));
        assert_eq!(learning.history().samples(), 4);
        // Handed over: stored, nothing unwritten.
        let all = learning.history();
        learning.handed_over(all);
        assert_eq!(learning.history().samples(), 4);
        assert!(learning.unwritten.samples() == 0);
    }

    #[test]
    fn a_history_of_another_bin_width_is_not_used() {
        let other = History::new(Duration::from_secs(1));
        let learning = Learning::new(Settings::default(), Some(&other));
        assert!(learning.stored.is_none());
    }
}
