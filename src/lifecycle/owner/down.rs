//! The way down: the idle timer (a deadline that honours every replica's recorded
//! activity, re-checked while the VM is busy), an explicit stop, pause or hibernate, the
//! scale-down itself, and what follows it — stopped, paused, hibernated, called off by a
//! peer, or started again for requests that arrived meanwhile.

use futures_util::FutureExt;
use tokio::time::Instant;

use super::{Done, Life, Owner, ScaledDown, StartKind};
use crate::backend::{BackendError, BackendPhase, StopOutcome, VmEvent};
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
        let due = match self.adaptive_idle_due() {
            Some(due) => due,
            None => idle::due(
                self.tx.gate().last_activity(),
                self.handle.0.context.backend.shared_activity(self.handle.key()),
                idle_for,
            ),
        };
        // Inside a keep-warm window (or the lead before one) the idle timeout waits for
        // its end.
        let due = due.max(self.kept_warm_until().unwrap_or(due));
        let now = Instant::now();
        if now < due {
            self.idle_at = Some(due);
        } else if self.tx.close_if_idle() {
            tracing::info!(vm = %self.handle.key(), action = action.as_str(), "VM idle; scaling down");
            self.before_idle_scale_down();
            self.begin_scale_down(action, true);
        } else {
            // Idle long enough, but a request is in flight or held: look again later.
            self.idle_at = Some(now + self.handle.0.context.idle.recheck);
        }
    }

    /// An explicit stop, pause or hibernate: at once if nothing is in flight or held.
    pub(super) fn scale_down_now(&mut self, action: Action) -> Result<(), ScaleDownRefused> {
        let applicable = matches!(
            (action, self.phase()),
            (_, VmPhase::Ready)
                | (Action::Stop | Action::Hibernate, VmPhase::Paused)
                | (Action::Stop, VmPhase::Hibernated)
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
        self.operator_stop = Some(Instant::now());
        self.begin_scale_down(action, false);
        Ok(())
    }

    /// The gate is closed (`Stopping`): stop, pause or hibernate the VM. An idle scale-down stops
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
                let stop = || async {
                    if idle {
                        backend.stop_if_idle(&key, local_activity).await.map(|o| match o {
                            StopOutcome::Stopped => ScaledDown::Stopped,
                            StopOutcome::PeerActive => ScaledDown::PeerActive,
                        })
                    } else {
                        backend.stop(&key).await.map(|()| ScaledDown::Stopped)
                    }
                };
                let result = match action {
                    Action::Stop => stop().await,
                    Action::Pause => match backend.pause(&key).await {
                        Ok(()) => Ok(ScaledDown::Paused),
                        Err(BackendError::Unsupported(_)) => {
                            tracing::warn!(vm = %key, "backend cannot pause; stopping instead");
                            stop().await
                        }
                        Err(error) => Err(error),
                    },
                    // An idle VM that cannot be saved (no support, disk budget, a failed
                    // save) is stopped: it was going to cost nothing either way.
                    Action::Hibernate => match backend.hibernate(&key).await {
                        Ok(()) => Ok(ScaledDown::Hibernated),
                        Err(error) => {
                            tracing::warn!(vm = %key, %error, "cannot hibernate; stopping instead");
                            stop().await
                        }
                    },
                };
                Done::ScaledDown(result)
            }
            .boxed(),
        );
    }

    /// The scale-down finished: stopped, paused, hibernated, failed, or called off.
    pub(super) fn on_scaled_down(&mut self, result: Result<ScaledDown, BackendError>) {
        let Life::Stopping { from } = self.life else {
            return;
        };
        let key = self.handle.key().clone();
        let metrics = self.tx.gate().metrics();
        let idle_for = Instant::now().saturating_duration_since(self.tx.gate().last_activity());
        let scaled = |action: Action| VmEvent::ScaledDown {
            action: action.as_str(),
            idle_for,
        };
        let (to, error) = match result {
            Ok(ScaledDown::PeerActive) => {
                tracing::info!(vm = %key, "a peer saw activity; keeping the VM");
                return self.resume_after_called_off_stop(from);
            }
            Ok(ScaledDown::Stopped) => {
                metrics.scaled_down(Action::Stop.as_str());
                self.record(scaled(Action::Stop));
                (VmPhase::Stopped, None)
            }
            Ok(ScaledDown::Paused) => {
                metrics.scaled_down(Action::Pause.as_str());
                self.record(scaled(Action::Pause));
                (VmPhase::Paused, None)
            }
            Ok(ScaledDown::Hibernated) => {
                metrics.scaled_down(Action::Hibernate.as_str());
                self.record(scaled(Action::Hibernate));
                (VmPhase::Hibernated, None)
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
            VmPhase::Hibernated => Life::Hibernated,
            VmPhase::Failed => Life::Failed,
            _ => Life::Stopped,
        };
        if !self.queue.is_empty() {
            tracing::info!(vm = %key, "requests arrived while scaling down; starting again");
            let kind = match to {
                VmPhase::Paused => StartKind::Resume,
                VmPhase::Hibernated => StartKind::Restore,
                _ => StartKind::Boot,
            };
            return self.start(kind);
        }
        self.tx.publish(to, &[], error);
        self.arm_idle_timer();
        self.apply_pending_policy();
        self.arm_prewarm();
    }

    /// The compare-and-stop found a peer's activity: back where the VM was. The next
    /// idle check waits at least `idle.check_interval`, whatever the deadline says — the
    /// peer's record may not have reached this replica's store yet, and each check can
    /// be an API call.
    ///
    /// Unless the peer's write that made ours fail was its own stop, and the backend
    /// already reports the VM stopped: then it is Stopped here too (booted again at once
    /// for requests held meanwhile), not Ready with an endpoint that is gone.
    pub(super) fn resume_after_called_off_stop(&mut self, from: VmPhase) {
        let stopped_by_peer = self
            .status
            .as_ref()
            .is_some_and(|status| status.borrow().phase == BackendPhase::Stopped);
        if stopped_by_peer && from != VmPhase::Hibernated {
            tracing::info!(vm = %self.handle.key(), "a peer stopped the VM");
            self.endpoints.clear();
            self.idle_at = None;
            self.life = Life::Stopped;
            self.tx.publish(VmPhase::Stopped, &[], None);
            if self.queue.is_empty() {
                self.apply_pending_policy();
                self.arm_prewarm();
            } else {
                self.start(StartKind::Boot);
            }
            return;
        }
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
            self.life = if from == VmPhase::Hibernated {
                Life::Hibernated
            } else {
                Life::Paused
            };
        }
        self.publish();
        self.arm_idle_timer();
        let not_before = Instant::now() + self.handle.0.context.idle.recheck;
        self.idle_at = self.idle_at.map(|at| at.max(not_before));
        match self.life {
            Life::Running { .. } => self.release_held(),
            Life::Hibernated if !self.queue.is_empty() => self.start(StartKind::Restore),
            _ if !self.queue.is_empty() => self.start(StartKind::Resume),
            _ => {}
        }
    }

    /// Sets the idle timer for the current phase (none if its plan has no scale-down):
    /// under the adaptive policy while Ready, the end of the current window.
    pub(super) fn arm_idle_timer(&mut self) {
        let policy = self.policy();
        let Some((_, idle_for)) = idle::plan(self.phase(), policy.scale_down, policy.idle_timeout) else {
            self.idle_at = None;
            return;
        };
        self.idle_at = Some(
            self.adaptive_idle_due()
                .unwrap_or_else(|| self.tx.gate().last_activity() + idle_for),
        );
    }
}
