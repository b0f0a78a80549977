//! The way up: a request that missed the warm path is queued and starts the VM; the
//! start call, the backend reporting the VM running, the guest's probe, then Ready and
//! the held requests released in arrival order through the concurrency limit. Whatever
//! fails on the way answers the held requests (and stops a half-started VM).

use futures_util::FutureExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::{Done, Life, Owner, StartKind};
use crate::backend::{BackendPhase, BackendStatus};
use crate::lifecycle::gate::Release;
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
            Life::Ready { .. } => self.release_held(None),
            // On its way up (released when Ready), or a stop or clean-up is running
            // (started again when it is done).
            _ => {}
        }
    }

    /// Publishes `Starting` and issues the start (or resume) call.
    pub(super) fn start(&mut self, kind: StartKind) {
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
        // What the backend said before this start is not news about it.
        status.borrow_and_update();
        let now = Instant::now();
        self.cold_start_from = Some(self.queue.front().map_or(now, |w| w.arrived));
        self.life = Life::Starting {
            called_at: now,
            returned_at: None,
            left_stopped: false,
            deadline: now + self.policy().start_timeout,
        };
        self.idle_at = None;
        self.tx.publish(VmPhase::Starting, None, None);
        tracing::debug!(vm = %key, ?kind, "starting");
        self.op = Some(
            async move {
                let result = match kind {
                    StartKind::Boot => context.backend.start(&key).await,
                    StartKind::Resume => context.backend.resume(&key).await,
                };
                Done::Started(result)
            }
            .boxed(),
        );
    }

    /// The backend's news about the VM: running (on its way up), stopped while starting
    /// (failed), stopped while Ready (lost), or running at a new address (re-probe).
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
            Life::Probing { .. } if status.phase == BackendPhase::Stopped => {
                self.fail(AdmitError::Stopped(stopped_message(&status).into()), true);
            }
            Life::Ready { endpoint } => match (status.phase, status.endpoint) {
                (BackendPhase::Stopped, _) => self.lost(stopped_message(&status)),
                // The guest moved (a new VMI, a new address): probe it there.
                (BackendPhase::Running, Some(moved)) if moved != endpoint => {
                    tracing::info!(vm = %self.handle.key(), %moved, "the guest has a new address; probing it");
                    self.probe(moved, false);
                }
                _ => {}
            },
            // Stopping: the stop we asked for. Stopped, Failed, Paused: not running.
            _ => {}
        }
    }

    /// Starting: whether the backend reports the VM running (→ probe) or dead.
    pub(super) fn check_running(&mut self) {
        let Life::Starting {
            returned_at,
            left_stopped,
            ..
        } = self.life
        else {
            return;
        };
        let Some(status) = self.status.as_ref().map(|s| s.borrow().clone()) else {
            return;
        };
        match (status.phase, status.endpoint, returned_at) {
            (BackendPhase::Running, Some(endpoint), Some(returned_at)) => {
                let metrics = self.tx.gate().metrics();
                metrics.cold_start_phase(ColdStartPhase::Boot, returned_at.elapsed().as_secs_f64());
                tracing::debug!(vm = %self.handle.key(), %endpoint, "backend reports running; probing");
                self.probe(endpoint, true);
            }
            (BackendPhase::Stopped, _, _) if left_stopped => {
                let message = status.message.unwrap_or_else(|| "the VM stopped while starting".into());
                self.fail(AdmitError::Stopped(message.into()), true);
            }
            _ => {}
        }
    }

    /// Probes the guest at `endpoint` until it answers: part of a cold start, or a
    /// re-probe of a guest that stopped answering (bounded by the start timeout).
    pub(super) fn probe(&mut self, endpoint: Endpoint, cold: bool) {
        let now = Instant::now();
        let deadline = match self.life {
            Life::Starting { deadline, .. } if cold => deadline,
            _ => now + self.policy().start_timeout,
        };
        self.life = Life::Probing {
            endpoint,
            since: now,
            deadline,
            cold,
        };
        self.idle_at = None;
        self.slot_wait = None;
        self.tx.publish(VmPhase::Probing, Some(endpoint), None);
        let probe = self.handle.0.context.probe.clone();
        let readiness = self.policy().readiness.clone();
        self.op = Some(
            async move {
                probe.wait_ready(endpoint, &readiness).await;
                Done::Probed
            }
            .boxed(),
        );
    }

    /// The guest answered: Ready (recording the cold start), then release.
    pub(super) fn on_probed(&mut self) {
        let Life::Probing {
            endpoint, since, cold, ..
        } = self.life
        else {
            return;
        };
        let key = self.handle.key().clone();
        if cold {
            let metrics = self.tx.gate().metrics();
            metrics.cold_start_phase(ColdStartPhase::Probe, since.elapsed().as_secs_f64());
            if let Some(first) = self.cold_start_from.take() {
                let took = first.elapsed();
                metrics.series().cold_start.observe(took.as_secs_f64());
                self.tx.record_cold_start(took);
                tracing::info!(vm = %key, %endpoint, held = self.queue.len(), cold_start_ms = took.as_millis() as u64, "VM ready");
            }
        } else {
            tracing::info!(vm = %key, %endpoint, "guest answers again");
        }
        self.life = Life::Ready { endpoint };
        self.tx.publish(VmPhase::Ready, Some(endpoint), None);
        self.arm_idle_timer();
        self.release_held(None);
    }

    /// Ready: hands held requests the endpoint in arrival order, each with a
    /// concurrency slot — `slot` if one was just freed, else any free one; when none is
    /// free, waits for one (an event) instead of blocking.
    pub(super) fn release_held(&mut self, mut slot: Option<OwnedSemaphorePermit>) {
        let Life::Ready { endpoint } = self.life else {
            return;
        };
        let limiter = self.tx.limiter();
        while let Some(waiter) = self.queue.pop_front() {
            if waiter.reply.is_closed() {
                continue;
            }
            let slot = match &limiter {
                None => None,
                Some(limiter) => match slot.take().or_else(|| limiter.clone().try_acquire_owned().ok()) {
                    Some(permit) => Some(permit),
                    None => {
                        self.queue.push_front(waiter);
                        let limiter = limiter.clone();
                        self.slot_wait = Some(
                            async move { limiter.acquire_owned().await.expect("the limiter is never closed") }.boxed(),
                        );
                        return;
                    }
                },
            };
            // A request that gave up just now hands its slot straight back (dropped).
            let _ = waiter.reply.send(Ok(Release { endpoint, slot }));
        }
        if self.queue.is_empty() {
            tracing::debug!(vm = %self.handle.key(), "held requests released");
        }
    }

    /// A start (or re-probe) failed: answer the held requests now, and — when the VM
    /// may be half up — stop it, so it does not keep running (and costing) unseen.
    pub(super) fn fail(&mut self, error: AdmitError, clean_up: bool) {
        let key = self.handle.key().clone();
        tracing::warn!(vm = %key, %error, "start failed");
        self.answer_held(error.clone());
        self.cold_start_from = None;
        self.slot_wait = None;
        self.idle_at = None;
        self.life = Life::Failed;
        self.tx.publish(VmPhase::Failed, None, Some(error.to_string().into()));
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
        self.life = Life::Stopped;
        self.tx.publish(VmPhase::Stopped, None, Some(message.into()));
        self.apply_pending_policy();
    }
}

/// The backend's reason for a stop, or a generic one.
fn stopped_message(status: &BackendStatus) -> String {
    status.message.clone().unwrap_or_else(|| "the VM stopped".into())
}
