//! The way down: the idle timer (a deadline that honours every replica's recorded
//! activity, re-checked while the VM is busy), an explicit stop or pause, the scale-down
//! itself, and what follows it — stopped, paused, called off by a peer, or started
//! again for requests that arrived meanwhile.

use futures_util::FutureExt;
use tokio::time::Instant;

use super::{Done, Life, Owner, ScaledDown, StartKind};
use crate::backend::{BackendError, StopOutcome};
use crate::lifecycle::idle::{self, Action};
use crate::lifecycle::ScaleDownRefused;
use crate::vm::VmPhase;

impl Owner {
    /// The idle deadline passed: scale down if the VM is still idle (here and at every
    /// replica) and nothing is in flight or held; otherwise set the next deadline.
    pub(super) fn on_idle_expired(&mut self) {
        let policy = self.policy();
        let Some((action, idle_for)) = idle::plan(self.phase(), policy.scale_down, policy.idle_timeout) else {
            self.idle_at = None;
            return;
        };
        let context = &self.handle.0.context;
        let due = idle::due(
            self.tx.gate().last_activity(),
            context.backend.shared_activity(self.handle.key()),
            idle_for,
        );
        let now = Instant::now();
        if now < due {
            self.idle_at = Some(due);
        } else if self.tx.close_if_idle() {
            tracing::info!(vm = %self.handle.key(), action = action.as_str(), "VM idle; scaling down");
            self.begin_scale_down(action, true);
        } else {
            // Idle long enough, but a request is in flight or held: look again later.
            self.idle_at = Some(now + context.idle_recheck);
        }
    }

    /// An explicit stop or pause: at once if nothing is in flight or held.
    pub(super) fn scale_down_now(&mut self, action: Action) -> Result<(), ScaleDownRefused> {
        let applicable = matches!(
            (action, self.phase()),
            (_, VmPhase::Ready) | (Action::Stop, VmPhase::Paused)
        );
        if !applicable {
            return Err(ScaleDownRefused::NotApplicable(self.phase(), action.as_str()));
        }
        if !self.tx.close_if_idle() {
            let gate = self.tx.gate();
            return Err(ScaleDownRefused::Busy {
                in_flight: gate.in_flight(),
                held: gate.held().0,
            });
        }
        tracing::info!(vm = %self.handle.key(), action = action.as_str(), "scaling down on request");
        self.begin_scale_down(action, false);
        Ok(())
    }

    /// The gate is closed (`Stopping`): stop or pause the VM. An idle scale-down stops
    /// with the backend's compare-and-stop, which other replicas' activity calls off.
    pub(super) fn begin_scale_down(&mut self, action: Action, idle: bool) {
        // The endpoints taking traffic are kept, in case the stop is called off.
        self.endpoints.stop_probing();
        self.life = Life::Stopping { from: self.phase() };
        self.idle_at = None;
        let key = self.handle.key().clone();
        let backend = self.handle.0.context.backend.clone();
        let local_activity = idle::wall_clock(self.tx.gate().last_activity());
        self.op = Some(
            async move {
                let result = match action {
                    Action::Stop if idle => backend.stop_if_idle(&key, local_activity).await.map(|o| match o {
                        StopOutcome::Stopped => ScaledDown::Stopped,
                        StopOutcome::PeerActive => ScaledDown::PeerActive,
                    }),
                    Action::Stop => backend.stop(&key).await.map(|()| ScaledDown::Stopped),
                    Action::Pause => match backend.pause(&key).await {
                        Ok(()) => Ok(ScaledDown::Paused),
                        Err(BackendError::Unsupported(_)) => {
                            tracing::warn!(vm = %key, "backend cannot pause; stopping instead");
                            backend.stop(&key).await.map(|()| ScaledDown::Stopped)
                        }
                        Err(error) => Err(error),
                    },
                };
                Done::ScaledDown(result)
            }
            .boxed(),
        );
    }

    /// The scale-down finished: stopped, paused, failed, or called off.
    pub(super) fn on_scaled_down(&mut self, result: Result<ScaledDown, BackendError>) {
        let Life::Stopping { from } = self.life else {
            return;
        };
        let key = self.handle.key().clone();
        let metrics = self.tx.gate().metrics();
        let (to, error) = match result {
            Ok(ScaledDown::PeerActive) => {
                tracing::info!(vm = %key, "a peer saw activity; keeping the VM");
                return self.resume_after_called_off_stop(from);
            }
            Ok(ScaledDown::Stopped) => {
                metrics.scaled_down(Action::Stop.as_str());
                (VmPhase::Stopped, None)
            }
            Ok(ScaledDown::Paused) => {
                metrics.scaled_down(Action::Pause.as_str());
                (VmPhase::Paused, None)
            }
            Err(error) => {
                // The VM may still be running: `Failed` makes the next request go through
                // a start (a no-op on a running VM) and a probe before it gets traffic.
                tracing::warn!(vm = %key, %error, "scale-down failed");
                (VmPhase::Failed, Some(format!("scale-down failed: {error}").into()))
            }
        };
        self.endpoints.clear();
        self.life = match to {
            VmPhase::Paused => Life::Paused,
            VmPhase::Failed => Life::Failed,
            _ => Life::Stopped,
        };
        if !self.queue.is_empty() {
            tracing::info!(vm = %key, "requests arrived while scaling down; starting again");
            let kind = if to == VmPhase::Paused {
                StartKind::Resume
            } else {
                StartKind::Boot
            };
            return self.start(kind);
        }
        self.tx.publish(to, &[], error);
        self.arm_idle_timer();
        self.apply_pending_policy();
    }

    /// The compare-and-stop found a peer's activity: back where the VM was. The next
    /// idle check waits at least `idle.check_interval`, whatever the deadline says — the
    /// peer's record may not have reached this replica's store yet, and each check can
    /// be an API call.
    pub(super) fn resume_after_called_off_stop(&mut self, from: VmPhase) {
        if from == VmPhase::Ready && self.endpoints.any_ready() {
            self.life = Life::Running {
                cold: false,
                since: Instant::now(),
                deadline: None,
            };
            // Endpoints may have come or gone while the stop was tried.
            if let Some(status) = self.status.as_ref().map(|s| s.borrow().clone()) {
                let how = self.probing();
                self.endpoints.sync(&status.endpoints, &how);
            }
        } else {
            self.endpoints.clear();
            self.life = Life::Paused;
        }
        self.publish();
        self.arm_idle_timer();
        let not_before = Instant::now() + self.handle.0.context.idle_recheck;
        self.idle_at = self.idle_at.map(|at| at.max(not_before));
        match self.life {
            Life::Running { .. } => self.release_held(),
            _ if !self.queue.is_empty() => self.start(StartKind::Resume),
            _ => {}
        }
    }

    /// Sets the idle timer for the current phase (none if its plan has no scale-down).
    pub(super) fn arm_idle_timer(&mut self) {
        let policy = self.policy();
        self.idle_at = idle::plan(self.phase(), policy.scale_down, policy.idle_timeout)
            .map(|(_, idle_for)| self.tx.gate().last_activity() + idle_for);
    }
}
