//! The way up: a request that missed the warm path is queued and starts the VM; the
//! start call, the backend reporting the VM running with its endpoints, each endpoint's
//! probe, then Ready once one answers and the held requests released in arrival order,
//! each to the least loaded endpoint with a free slot. While Ready the endpoints follow
//! the backend (new ones probed first), and one that refuses a connection is taken out
//! and probed again. Whatever fails on the way answers the held requests (and stops a
//! half-started VM).

use std::sync::Arc;

use futures_util::FutureExt;
use tokio::time::Instant;

use super::{Done, Life, Owner, StartKind};
use crate::backend::{BackendPhase, BackendStatus, VmEvent};
use crate::lifecycle::gate::{take, ColdStart, ColdStartPhaseSpan, Release};
use crate::lifecycle::{AdmitError, Waiter};
use crate::metrics::ColdStartPhase;
use crate::vm::{Endpoint, VmPhase};

impl Owner {
    /// A request that missed the warm path: queue it, and start the VM if it is not
    /// running or on its way.
    pub(super) fn activate(&mut self, waiter: Waiter) {
        if let Some(error) = &self.rejecting {
            let _ = waiter.reply.send(Err(error.clone()));
            return;
        }
        // Requests that gave up leave a closed reply behind; drop them before the queue
        // can grow past its bound.
        if self.queue.len() >= self.policy().max_buffered {
            self.queue.retain(|w| !w.reply.is_closed());
        }
        self.queue.push_back(waiter);
        match self.life {
            Life::Stopped | Life::Failed if self.op.is_none() => self.start(StartKind::Boot),
            Life::Paused => self.start(StartKind::Resume),
            Life::Hibernated => self.start(StartKind::Restore),
            Life::Running { .. } => self.release_held(),
            // On its way up (released when Ready), or a stop or clean-up is running
            // (started again when it is done).
            _ => {}
        }
    }

    /// When the first held request will have waited `start_timeout`.
    pub(super) fn held_deadline(&self) -> Option<Instant> {
        let first = self.queue.front()?;
        Some(first.arrived + self.policy().start_timeout)
    }

    /// Answers `StartTimeout` to the held requests that have waited `start_timeout` (the
    /// queue is in arrival order).
    pub(super) fn expire_held(&mut self) {
        let timeout = self.policy().start_timeout;
        let now = Instant::now();
        while self.queue.front().is_some_and(|w| w.arrived + timeout <= now) {
            if let Some(waiter) = self.queue.pop_front() {
                let _ = waiter.reply.send(Err(AdmitError::StartTimeout(timeout)));
            }
        }
    }

    /// Publishes `Starting` and issues the start (or resume) call.
    pub(super) fn start(&mut self, kind: StartKind) {
        self.start_for(kind, false);
    }

    /// As [`Owner::start`]; `predicted`: ahead of the event the idle policy expects.
    pub(super) fn start_for(&mut self, kind: StartKind, predicted: bool) {
        let key = self.handle.key().clone();
        let context = self.handle.0.context.clone();
        if self.status.is_none() {
            self.status = context.backend.status(&key);
        }
        let Some(status) = &mut self.status else {
            self.fail(
                AdmitError::StartFailed("the backend does not know this VM".into()),
                false,
            );
            return;
        };
        // What the backend said before this start is not news about it. A VM it kept
        // hibernated (from before this owner, or this activator) is a restore.
        let kind = match status.borrow_and_update().phase {
            BackendPhase::Hibernated if kind == StartKind::Boot => StartKind::Restore,
            _ => kind,
        };
        let now = Instant::now();
        self.cold_start_from = Some(self.queue.front().map_or(now, |w| w.arrived));
        self.endpoints.clear();
        self.life = Life::Starting {
            called_at: now,
            returned_at: None,
            left_stopped: false,
            deadline: now + self.policy().start_timeout,
            kind,
        };
        self.idle_at = None;
        self.publish();
        tracing::debug!(vm = %key, ?kind, "starting");
        self.record(VmEvent::ScaledUp {
            kind: kind.phase().as_str(),
            trigger: self.queue.front().and_then(|w| w.trigger.as_deref().cloned()),
            held: self.queue.len(),
            predicted,
        });
        self.op = Some(
            async move {
                let result = match kind {
                    StartKind::Boot | StartKind::Restore => context.backend.start(&key).await,
                    StartKind::Resume => context.backend.resume(&key).await,
                };
                Done::Started(result)
            }
            .boxed(),
        );
    }

    /// The backend's news about the VM: running (on its way up, or with other
    /// endpoints), stopped while starting (failed) or while running (lost).
    pub(super) fn on_status(&mut self, status: BackendStatus) {
        match self.life {
            Life::Starting {
                ref mut left_stopped,
                returned_at,
                ..
            } => {
                if status.phase != BackendPhase::Stopped {
                    *left_stopped = true;
                }
                if returned_at.is_some() || (status.phase == BackendPhase::Stopped && *left_stopped) {
                    self.check_running();
                }
            }
            Life::Running { cold, .. } => match status.phase {
                BackendPhase::Stopped if cold => {
                    self.fail(AdmitError::Stopped(stopped_message(&status).into()), true);
                }
                BackendPhase::Stopped => self.lost(stopped_message(&status)),
                // Pods come and go (replaced, rescaled by hand, terminating): traffic
                // follows the endpoints the backend reports, none while it reports none.
                BackendPhase::Running | BackendPhase::Starting | BackendPhase::Stopping => {
                    self.follow_endpoints(&status.endpoints)
                }
                BackendPhase::Paused | BackendPhase::Hibernated => {}
            },
            // Stopping: the stop we asked for. Stopped, Failed, Paused, Hibernated: not running.
            _ => {}
        }
    }

    /// Starting: whether the backend reports the VM running (→ probe its endpoints) or
    /// dead.
    pub(super) fn check_running(&mut self) {
        let Life::Starting {
            called_at,
            returned_at,
            left_stopped,
            deadline,
            kind,
        } = self.life
        else {
            return;
        };
        let Some(status) = self.status.as_ref().map(|s| s.borrow().clone()) else {
            return;
        };
        match (status.phase, returned_at) {
            (BackendPhase::Running, Some(returned_at)) if !status.endpoints.is_empty() => {
                let metrics = self.tx.gate().metrics();
                let from = if kind == StartKind::Restore {
                    called_at
                } else {
                    returned_at
                };
                metrics.cold_start_phase(kind.phase(), from.elapsed().as_secs_f64());
                self.cold_phases.1 = from.elapsed();
                tracing::debug!(vm = %self.handle.key(), endpoints = ?status.endpoints, "backend reports running; probing");
                self.life = Life::Running {
                    cold: true,
                    since: Instant::now(),
                    deadline: Some(deadline),
                };
                let how = self.probing();
                self.endpoints.sync(&status.endpoints, &how);
                self.publish();
            }
            (BackendPhase::Stopped, _) if left_stopped => {
                let message = status.message.unwrap_or_else(|| "the VM stopped while starting".into());
                self.fail(AdmitError::Stopped(message.into()), true);
            }
            _ => {}
        }
    }

    /// Running: the backend's endpoints changed (pods came or went, the guest moved).
    /// Those gone leave the traffic at once; new ones take it once they pass a probe.
    fn follow_endpoints(&mut self, wanted: &[Endpoint]) {
        let how = self.probing();
        let was_ready = self.endpoints.any_ready();
        if self.endpoints.sync(wanted, &how) {
            self.after_losing_endpoints(was_ready, "the backend no longer reports it");
            self.publish();
        }
    }

    /// A request could not connect to `endpoint`: no more traffic to it until a probe
    /// passes again; the other endpoints keep serving.
    pub(super) fn on_unreachable(&mut self, endpoint: Endpoint) {
        if !matches!(self.life, Life::Running { .. }) {
            return;
        }
        let how = self.probing();
        let was_ready = self.endpoints.any_ready();
        if self.endpoints.reprobe(endpoint, &how) {
            tracing::warn!(vm = %self.handle.key(), %endpoint, "guest unreachable; re-probing");
            self.after_losing_endpoints(was_ready, "it refused a connection");
            self.publish();
        }
    }

    /// The last endpoint taking traffic is gone: Probing again, bounded by the start
    /// timeout; held requests wait for an endpoint to pass its probe.
    fn after_losing_endpoints(&mut self, was_ready: bool, why: &str) {
        if was_ready && !self.endpoints.any_ready() {
            tracing::info!(vm = %self.handle.key(), why, "no endpoint takes traffic; probing");
            let give_up = Instant::now() + self.policy().start_timeout;
            if let Life::Running { ref mut deadline, .. } = self.life {
                *deadline = Some(give_up);
            }
            self.idle_at = None;
            self.slot_wait = None;
        }
    }

    /// An endpoint passed its probe: it takes traffic. The first one makes the VM Ready
    /// (recording the cold start) and releases the held requests.
    pub(super) fn on_probed(&mut self, endpoint: Endpoint) {
        let Life::Running { cold, since, .. } = self.life else {
            return;
        };
        let was_ready = self.endpoints.any_ready();
        if !self.endpoints.passed(endpoint, self.policy().concurrency) {
            return;
        }
        let key = self.handle.key().clone();
        if !was_ready {
            if cold {
                let metrics = self.tx.gate().metrics();
                metrics.cold_start_phase(ColdStartPhase::Probe, since.elapsed().as_secs_f64());
                if let Some(first) = self.cold_start_from.take() {
                    let took = first.elapsed();
                    metrics.series().cold_start.observe(took.as_secs_f64());
                    self.tx.record_cold_start(took);
                    tracing::debug!(vm = %key, %endpoint, "first endpoint takes traffic");
                    let (start_call, boot) = self.cold_phases;
                    self.cold_start = Some(Arc::new(self.cold_timeline(since)));
                    self.record(VmEvent::Ready {
                        cold_start: took,
                        start_call,
                        boot,
                        probe: since.elapsed(),
                        held: self.queue.len(),
                    });
                }
            } else {
                tracing::info!(vm = %key, %endpoint, "guest answers again");
            }
            self.life = Life::Running {
                cold: false,
                since,
                deadline: None,
            };
            self.arm_idle_timer();
        } else {
            tracing::debug!(vm = %key, %endpoint, "another endpoint takes traffic");
        }
        self.publish();
        self.release_held();
    }

    /// The phases of the cold start that just ended (the guest answered now; it was
    /// reported running at `running_at`).
    fn cold_timeline(&self, running_at: Instant) -> ColdStart {
        let (start_call, boot) = self.cold_phases;
        let ready_at = Instant::now();
        let returned_at = running_at.checked_sub(boot).unwrap_or(running_at);
        let called_at = returned_at.checked_sub(start_call).unwrap_or(returned_at);
        let phase = |name, from, to| ColdStartPhaseSpan { name, from, to };
        let mut phases = match self.cold_kind {
            // A restore happens inside the start call: one phase up to running.
            StartKind::Restore => vec![phase("restore", called_at, running_at)],
            kind => vec![
                phase("start call", called_at, returned_at),
                phase(kind.phase().as_str(), returned_at, running_at),
            ],
        };
        phases.push(phase("probe", running_at, ready_at));
        ColdStart { phases }
    }

    /// Ready: hands held requests a slot on the least loaded endpoint, in arrival order;
    /// when every endpoint is at its limit, waits for a slot (an event) instead of
    /// blocking.
    pub(super) fn release_held(&mut self) {
        if !self.endpoints.any_ready() || !matches!(self.life, Life::Running { .. }) {
            return;
        }
        while let Some(waiter) = self.queue.pop_front() {
            if waiter.reply.is_closed() {
                continue;
            }
            // Held through the last cold start: its trace shows that start's phases.
            let cold = self
                .cold_start
                .as_ref()
                .filter(|cold| cold.phases.last().is_some_and(|probe| waiter.arrived <= probe.to))
                .cloned();
            let Some(taken) = take(self.endpoints.ready()) else {
                self.queue.push_front(waiter);
                if self.slot_wait.is_none() {
                    self.slot_wait = Some(self.tx.slot_freed().boxed());
                }
                return;
            };
            // A request that gave up just now gives its slot straight back (dropped).
            let _ = waiter.reply.send(Ok(Release { taken, cold }));
        }
        self.cold_start = None;
        tracing::debug!(vm = %self.handle.key(), "held requests released");
    }

    /// A start (or re-probe) failed: answer the held requests now, and — when the VM
    /// may be half up — stop it, so it does not keep running (and costing) unseen.
    pub(super) fn fail(&mut self, error: AdmitError, clean_up: bool) {
        let key = self.handle.key().clone();
        let answered = self.queue.iter().filter(|w| !w.reply.is_closed()).count();
        self.record(match &error {
            AdmitError::StartTimeout(after) => VmEvent::StartTimedOut {
                after: *after,
                answered,
            },
            other => VmEvent::StartFailed {
                reason: other.to_string(),
                answered,
            },
        });
        self.answer_held(error.clone());
        self.cold_start_from = None;
        self.slot_wait = None;
        self.idle_at = None;
        self.endpoints.clear();
        self.life = Life::Failed;
        self.tx.publish(VmPhase::Failed, &[], Some(error.to_string().into()));
        if clean_up {
            let backend = self.handle.0.context.backend.clone();
            self.op = Some(
                async move {
                    if let Err(error) = backend.stop(&key).await {
                        tracing::warn!(vm = %key, %error, "stop after failed start failed");
                    }
                    Done::CleanedUp
                }
                .boxed(),
            );
        } else {
            self.op = None;
            self.apply_pending_policy();
        }
    }

    /// A Ready VM stopped without being asked (crash, guest power-off, someone else).
    pub(super) fn lost(&mut self, message: String) {
        let key = self.handle.key();
        if self.handle.0.context.is_draining() {
            tracing::info!(vm = %key, %message, "VM stopped for shutdown");
        } else {
            tracing::warn!(vm = %key, %message, "VM stopped without being asked");
        }
        self.answer_held(AdmitError::Stopped(message.as_str().into()));
        self.slot_wait = None;
        self.idle_at = None;
        self.endpoints.clear();
        self.life = Life::Stopped;
        self.tx.publish(VmPhase::Stopped, &[], Some(message.into()));
        self.apply_pending_policy();
        // A peer's scale-down, most often: the next expected event is still expected.
        self.arm_prewarm();
    }
}

/// The backend's reason for a stop, or a generic one.
fn stopped_message(status: &BackendStatus) -> String {
    status.message.clone().unwrap_or_else(|| "the VM stopped".into())
}
