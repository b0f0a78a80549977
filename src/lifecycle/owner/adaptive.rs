//! The adaptive idle policy in the owner's life (`idle_policy` decides, this acts): the
//! plan made from what the VM's learning holds, the idle deadline it sets while the VM is
//! up (the end of the current window), the pre-warm timer while the VM is at rest (the
//! start of the next window), and the history handed to the backend with each idle
//! scale-down.
//!
//! Time is measured from the last arrival anyone knows of: here, as the stored history
//! says, or at a peer (whose later activity, not recorded yet, may go on for up to its
//! recording interval: a stop waits that much longer for it). A periodic sender's idle
//! periods are then the same whether its events found the VM cold or warm. The VM is
//! never scaled down while a request is in flight or held, whatever the plan says.
//!
//! A pre-warm is a start like keep-warm's: through the owner, `scale_ups_total`, a
//! `ScaledUp` Event that says it was predicted. It does not count as activity; an event
//! that comes while it is up makes it `used`, one scaled down without an event `unused`.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::Owner;
use crate::idle_policy::{IdlePolicy, Plan, Step};
use crate::lifecycle::IdleDecision;
use crate::vm::VmPhase;

/// The cold start assumed before any was measured, for a pre-warm's lead.
const FIRST_COLD_START: Duration = Duration::from_secs(30);

impl Owner {
    /// Whether the VM runs under the adaptive idle policy.
    pub(super) fn adaptive(&self) -> bool {
        self.handle.0.context.idle.policy_of(&self.policy()) == IdlePolicy::Adaptive
    }

    /// The last arrival, on the wall clock; with `peer_slack`, a peer's record counts as
    /// activity until its next record could have come.
    fn last_arrival(&self, stored: Option<SystemTime>, peer_slack: bool) -> Option<SystemTime> {
        let wall = self.wall_now();
        let gate = self.tx.gate();
        let local = gate
            .last_arrival_if_any()
            .map(|at| wall - Instant::now().saturating_duration_since(at));
        let slack = if peer_slack { gate.share_every() } else { Duration::ZERO };
        let peer = self.handle.peer_activity().map(|at| at + slack);
        [local, stored, peer].into_iter().flatten().max()
    }

    /// The plan for what is known now, and the last arrival it counts from;
    /// `None` under the fixed idle timeout. Made once per change of the learning or the
    /// cold start.
    fn plan(&mut self, peer_slack: bool) -> Option<(Plan, SystemTime)> {
        if !self.adaptive() {
            return None;
        }
        let fallback = self.policy().idle_timeout;
        let measured = self.tx.gate().last_cold_start();
        let (plan, stored) = {
            let guard = self.handle.lock_learning();
            let learning = guard.as_ref()?;
            let settings = *learning.settings();
            let cold_start = measured.or(learning.stored_cold_start()).unwrap_or(FIRST_COLD_START);
            let lead = settings.lead(cold_start);
            let version = (learning.version(), lead);
            let plan = match &self.plan_cache {
                Some((cached, plan)) if *cached == version => plan.clone(),
                _ => {
                    let plan = Plan::adaptive(Some(&learning.history()), &settings, lead, fallback);
                    self.plan_cache = Some((version, plan.clone()));
                    plan
                }
            };
            (plan, learning.stored_activity())
        };
        let end = self.last_arrival(stored, peer_slack).unwrap_or_else(|| self.wall_now());
        Some((plan, end))
    }

    /// Under the adaptive policy, while the VM is Ready: when its current window ends
    /// (now, if the plan has it down).
    pub(super) fn adaptive_idle_due(&mut self) -> Option<Instant> {
        if self.phase() != VmPhase::Ready {
            return None;
        }
        let (plan, end) = self.plan(true)?;
        let elapsed = self.wall_now().duration_since(end).unwrap_or_default();
        let (step, due) = match plan.step(elapsed) {
            Step::Up { until } => ("up", self.instant_at(end + until)),
            Step::Down { .. } => ("down", Instant::now()),
        };
        tracing::debug!(
            vm = %self.handle.key(),
            step,
            since_arrival = ?elapsed,
            scale_down_in = ?due.saturating_duration_since(Instant::now()),
            windows = ?plan.windows(),
            "adaptive idle deadline"
        );
        self.show_decision(&plan, None);
        Some(due)
    }

    /// Sets the pre-warm timer while the VM is at rest: the start of the plan's next
    /// pre-warm window that has not ended — now, if it has begun (a slow scale-down
    /// finished inside it). None under the fixed idle timeout, when no window is left, or
    /// after an operator's stop until the next activity.
    pub(super) fn arm_prewarm(&mut self) {
        self.prewarm_at = None;
        let at_rest = matches!(self.phase(), VmPhase::Stopped | VmPhase::Paused | VmPhase::Hibernated);
        if !at_rest || self.op.is_some() {
            return;
        }
        if let Some(stopped_at) = self.operator_stop {
            let active_since = self.tx.gate().last_activity_if_any().is_some_and(|at| at > stopped_at);
            if !active_since {
                return;
            }
            self.operator_stop = None;
        }
        let Some((plan, end)) = self.plan(false) else {
            return;
        };
        let elapsed = self.wall_now().duration_since(end).unwrap_or_default();
        let next = plan
            .windows()
            .iter()
            .find(|w| !w.start.is_zero() && w.until > elapsed)
            .copied();
        let start = next.map(|w| end + w.start.max(elapsed));
        self.prewarm_at = start.map(|at| self.instant_at(at));
        tracing::debug!(
            vm = %self.handle.key(),
            since_arrival = ?elapsed,
            prewarm_in = ?self.prewarm_at.map(|at| at.saturating_duration_since(Instant::now())),
            windows = ?plan.windows(),
            "adaptive pre-warm"
        );
        self.show_decision(&plan, start);
    }

    /// The pre-warm timer fired: start the VM ahead of the expected event, unless it is
    /// up or on its way already, or the activator is draining.
    pub(super) fn on_prewarm_due(&mut self) {
        self.prewarm_at = None;
        if self.rejecting.is_some() || self.handle.0.context.is_draining() {
            return;
        }
        if self.op.is_some() || !self.queue.is_empty() {
            return;
        }
        if let Some(kind) = self.start_kind() {
            tracing::info!(vm = %self.handle.key(), "pre-warm: starting ahead of the expected event");
            self.tx.set_prewarmed();
            self.start_for(kind, true);
        }
    }

    /// Before an idle scale-down: a pre-warm no event came to is `unused`, and the whole
    /// history — with the last arrival and the cold start — is handed to the backend,
    /// which keeps it with this scale-down.
    pub(super) fn before_idle_scale_down(&mut self) {
        let gate = self.tx.gate();
        if gate.take_prewarm() {
            gate.metrics().prewarm(false);
        }
        if !self.adaptive() {
            return;
        }
        let measured = gate.last_cold_start();
        let mut learning = self.handle.lock_learning();
        let Some(learning) = learning.as_mut() else {
            return;
        };
        let mut history = learning.history();
        let stored = learning.stored_activity();
        if let Some(end) = self.last_arrival(stored, false) {
            history.set_last_activity(end);
        }
        if let Some(cold_start) = measured.or(learning.stored_cold_start()) {
            history.set_cold_start(cold_start);
        }
        self.handle
            .0
            .context
            .backend
            .record_idle_history(self.handle.key(), &history.to_string());
        learning.handed_over(history);
    }

    /// Publishes the decision for `/v1/vms`.
    fn show_decision(&self, plan: &Plan, next_prewarm: Option<SystemTime>) {
        let mut learning = self.handle.lock_learning();
        if let Some(learning) = learning.as_mut() {
            let samples = learning.samples();
            learning.set_decision(IdleDecision {
                policy: IdlePolicy::Adaptive,
                learned: plan.is_learned(),
                samples,
                keep_alive: plan.keep_alive(),
                next_prewarm,
            });
        }
    }
}
