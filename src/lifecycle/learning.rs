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
//!
//! Also here: the handle's side of it (`impl VmHandle`): recording an arrival's idle
//! period, taking a stored history, the decision for `/v1/vms`.

use std::sync::MutexGuard;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::VmHandle;
use crate::idle_policy::{History, IdlePolicy, Settings};
use crate::vm::Policy;

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

    /// Idle periods known: stored, and seen here since.
    pub(super) fn samples(&self) -> u32 {
        self.stored.as_ref().map_or(0, History::samples) + self.unwritten.samples()
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

/// A VM's learning as its handle reaches it: created and fed from arrivals, adopted
/// from the catalog, read by `/v1/vms`.
impl VmHandle {
    /// Whether `policy` wants the VM's owner running while the VM is at rest: to start it
    /// ahead of a keep-warm window, or ahead of the event its stored idle history predicts.
    pub fn needs_owner(&self, policy: &Policy) -> bool {
        let adaptive = self.0.context.idle.policy_of(policy) == IdlePolicy::Adaptive;
        policy.keep_warm.is_some() || (adaptive && policy.idle_history.is_some())
    }

    /// The adaptive idle policy's current decision for this VM (`None` under the fixed
    /// idle timeout).
    pub fn idle_decision(&self) -> Option<IdleDecision> {
        let policy = self.0.context.idle.policy_of(&self.0.gate.policy());
        let learning = self.lock_learning();
        let learning = learning.as_ref()?;
        Some(learning.decision().unwrap_or_else(|| IdleDecision {
            policy,
            learned: false,
            samples: learning.samples(),
            keep_alive: self.0.gate.policy().idle_timeout,
            next_prewarm: None,
        }))
    }

    pub(super) fn lock_learning(&self) -> MutexGuard<'_, Option<Box<Learning>>> {
        // Never held across an await; a panic cannot leave the counts half-written.
        self.0.learning.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Learns under `policy` if it is adaptive (created on the first such policy, the
    /// stored history adopted) — or stops learning.
    pub(super) fn sync_learning(&self, policy: &Policy) {
        let rules = &self.0.context.idle;
        let mut learning = self.lock_learning();
        if rules.policy_of(policy) != IdlePolicy::Adaptive {
            *learning = None;
            self.0.gate.set_learning(None);
            return;
        }
        let stored = policy.idle_history.as_deref();
        match learning.as_mut() {
            Some(learning) => {
                if let Some(stored) = stored {
                    learning.adopt(stored);
                }
            }
            None => *learning = Some(Box::new(Learning::new(rules.adaptive, stored))),
        }
        self.0.gate.set_learning(Some(rules.adaptive.bin));
    }

    /// An arrival ended an idle period here (the previous arrival here was at `local`, if
    /// any): records the gap from the latest arrival anyone knows of, and counts a
    /// pre-warm it found as used.
    pub(super) fn learn_from_arrival(&self, local: Option<Instant>) {
        let gate = &self.0.gate;
        if gate.take_prewarm() {
            gate.metrics().prewarm(true);
        }
        let now = (self.0.context.wall_clock)();
        let local = local.map(|at| now - Instant::now().saturating_duration_since(at));
        let mut learning = self.lock_learning();
        let Some(learning) = learning.as_mut() else {
            return;
        };
        let origin = [local, learning.stored_activity(), self.peer_activity()]
            .into_iter()
            .flatten()
            .max();
        if let Some(gap) = origin.and_then(|origin| now.duration_since(origin).ok()) {
            if learning.record(gap) {
                tracing::debug!(vm = %self.key(), gap = ?gap, "idle period recorded");
            }
        }
    }

    /// The latest activity another replica recorded, if it is later than anything this
    /// replica shared.
    pub(super) fn peer_activity(&self) -> Option<SystemTime> {
        let shared = self.0.context.backend.shared_activity(self.key())?;
        self.0.gate.is_peer_record(shared).then_some(shared)
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
