//! The owner of one VM's life: a task that takes events one at a time and is the only
//! code that moves the VM from phase to phase (docs/architecture.md has the diagram).
//!
//! Events are the commands sent through the `VmHandle`, the backend's status stream,
//! the start deadline, the idle timer, concurrency slots freeing up, and the results of
//! the one backend call or probe the owner runs at a time (`Op`). A start is: start call
//! → the backend reports the VM running with an endpoint → the guest answers a probe →
//! Ready, and the held requests are released in arrival order through the VM's
//! concurrency limit. Whatever goes wrong on the way answers the held requests and
//! stops the half-started VM; requests that arrive meanwhile start it again afterwards.
//!
//! Owns: the phase transitions, the queue of held requests, starts, probes,
//! scale-downs. Must not import HTTP, `ingress`, `server`, `activator`, or backend
//! implementations.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::gate::{GateTx, Release};
use super::idle::{self, Action};
use super::{AdmitError, Command, ScaleDownRefused, VmHandle, Waiter};
use crate::backend::{BackendError, BackendPhase, BackendStatus, StopOutcome};
use crate::metrics::ColdStartPhase;
use crate::vm::{Endpoint, Policy, VmPhase};

/// What kind of start the VM needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartKind {
    /// A boot from Stopped or Failed.
    Boot,
    /// A resume from Paused.
    Resume,
}

/// Where the VM is in its life, with what each phase needs to remember.
#[derive(Clone, Copy, Debug)]
enum Life {
    Stopped,
    /// The last start failed (or a scale-down did). While a clean-up stop runs, new
    /// requests wait for it.
    Failed,
    Starting {
        called_at: Instant,
        /// When the start call returned.
        returned_at: Option<Instant>,
        /// The backend reported something other than Stopped since the call: a Stopped
        /// after that means the VM died while starting.
        left_stopped: bool,
        deadline: Instant,
    },
    Probing {
        endpoint: Endpoint,
        since: Instant,
        deadline: Instant,
        /// Part of a cold start (else a re-probe of a guest that stopped answering).
        cold: bool,
    },
    Ready {
        endpoint: Endpoint,
    },
    Stopping {
        /// Where the VM was; a stop that is called off goes back there.
        from: VmPhase,
        endpoint: Option<Endpoint>,
    },
    Paused,
}

impl Life {
    fn phase(&self) -> VmPhase {
        match self {
            Life::Stopped => VmPhase::Stopped,
            Life::Failed => VmPhase::Failed,
            Life::Starting { .. } => VmPhase::Starting,
            Life::Probing { .. } => VmPhase::Probing,
            Life::Ready { .. } => VmPhase::Ready,
            Life::Stopping { .. } => VmPhase::Stopping,
            Life::Paused => VmPhase::Paused,
        }
    }

    fn start_deadline(&self) -> Option<Instant> {
        match self {
            Life::Starting { deadline, .. } | Life::Probing { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }
}

/// The one backend call or probe in progress, with what it returns.
enum Done {
    Started(Result<(), BackendError>),
    Probed,
    ScaledDown(Result<ScaledDown, BackendError>),
    CleanedUp,
}

/// How a scale-down ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScaledDown {
    Stopped,
    Paused,
    /// Another replica saw activity meanwhile: the VM keeps running.
    PeerActive,
}

enum Event {
    Command(Command),
    Status,
    StatusGone,
    StartDeadline,
    IdleTimer,
    Done(Done),
    Slot(OwnedSemaphorePermit),
}

/// Whether the owner goes on after an event.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

pub(super) struct Owner {
    handle: VmHandle,
    tx: GateTx,
    inbox: mpsc::UnboundedReceiver<Command>,
    life: Life,
    /// The backend's status stream, from the first start on.
    status: Option<watch::Receiver<BackendStatus>>,
    queue: VecDeque<Waiter>,
    /// Arrival of the earliest request held for the current cold start.
    cold_start_from: Option<Instant>,
    /// A policy that takes effect once the VM is stopped.
    pending_policy: Option<Arc<Policy>>,
    /// After the drain deadline: the answer for every request that still arrives.
    rejecting: Option<AdmitError>,
    op: Option<BoxFuture<'static, Done>>,
    /// Waiting for a concurrency slot for the first held request.
    slot_wait: Option<BoxFuture<'static, OwnedSemaphorePermit>>,
    idle_at: Option<Instant>,
}

/// Awaits `future` if there is one; never resolves otherwise (a disabled `select!` arm).
async fn maybe<F: Future>(future: Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Owner {
    pub(super) fn new(handle: VmHandle, tx: GateTx, inbox: mpsc::UnboundedReceiver<Command>) -> Owner {
        // A new owner takes over where the last one parked the VM.
        let life = match tx.gate().phase() {
            VmPhase::Paused => Life::Paused,
            VmPhase::Failed => Life::Failed,
            _ => Life::Stopped,
        };
        let mut owner = Owner {
            handle,
            tx,
            inbox,
            life,
            status: None,
            queue: VecDeque::new(),
            cold_start_from: None,
            pending_policy: None,
            rejecting: None,
            op: None,
            slot_wait: None,
            idle_at: None,
        };
        owner.arm_idle_timer();
        owner
    }

    /// Takes events until the VM has nothing going on (or leaves the catalog).
    pub(super) async fn run(mut self) {
        loop {
            let event = self.next_event().await;
            if self.on(event) == Flow::End {
                return;
            }
            while self.is_dormant() {
                match self.handle.retire(&mut self.inbox, self.tx) {
                    Ok(()) => return,
                    Err((tx, command)) => {
                        self.tx = tx;
                        if self.on(Event::Command(command)) == Flow::End {
                            return;
                        }
                    }
                }
            }
        }
    }

    async fn next_event(&mut self) -> Event {
        let start_deadline = self.life.start_deadline();
        let idle_at = self.idle_at;
        tokio::select! {
            biased;
            changed = maybe(self.status.as_mut().map(|s| s.changed())) => match changed {
                Ok(()) => Event::Status,
                Err(_) => Event::StatusGone,
            },
            done = maybe(self.op.as_mut()) => Event::Done(done),
            _ = sleep_until(start_deadline) => Event::StartDeadline,
            Some(command) = self.inbox.recv() => Event::Command(command),
            slot = maybe(self.slot_wait.as_mut()) => Event::Slot(slot),
            _ = sleep_until(idle_at) => Event::IdleTimer,
        }
    }

    fn on(&mut self, event: Event) -> Flow {
        match event {
            Event::Command(command) => return self.on_command(command),
            Event::Status => {
                let status = match &mut self.status {
                    Some(status) => status.borrow_and_update().clone(),
                    None => return Flow::Continue,
                };
                self.on_status(status);
            }
            Event::StatusGone => {
                self.status = None;
                self.on_status(BackendStatus {
                    message: Some("the backend stopped reporting this VM".into()),
                    ..BackendStatus::stopped()
                });
            }
            Event::StartDeadline => {
                if matches!(self.life, Life::Starting { .. } | Life::Probing { .. }) {
                    let timeout = self.policy().start_timeout;
                    self.fail(AdmitError::StartTimeout(timeout), true);
                }
            }
            Event::IdleTimer => self.on_idle_timer(),
            Event::Done(done) => {
                self.op = None;
                self.on_done(done);
            }
            Event::Slot(slot) => {
                self.slot_wait = None;
                self.release_held(Some(slot));
            }
        }
        Flow::Continue
    }

    fn on_command(&mut self, command: Command) -> Flow {
        match command {
            Command::Activate(waiter) => self.activate(waiter),
            Command::Unreachable(endpoint) => {
                if matches!(self.life, Life::Ready { endpoint: current } if current == endpoint) {
                    tracing::warn!(vm = %self.handle.key(), %endpoint, "guest unreachable; re-probing");
                    self.probe(endpoint, false);
                }
            }
            Command::ScaleDown { action, reply } => {
                let _ = reply.send(self.scale_down_now(action));
            }
            Command::CatalogChanged(policy) => {
                self.pending_policy = Some(policy);
                self.apply_pending_policy();
            }
            Command::Removed => {
                tracing::info!(vm = %self.handle.key(), "VM left the catalog");
                let message: Arc<str> = "the VM was removed from the catalog".into();
                self.answer_held(AdmitError::Stopped(message.clone()));
                self.tx.publish(VmPhase::Stopped, None, Some(message));
                return Flow::End;
            }
            Command::RejectHeld(error) => {
                self.answer_held(error.clone());
                self.rejecting = Some(error);
            }
        }
        Flow::Continue
    }

    /// A request that missed the warm path: queue it, and start the VM if it is not
    /// running or on its way.
    fn activate(&mut self, waiter: Waiter) {
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

    fn start(&mut self, kind: StartKind) {
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

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Started(result) => {
                let Life::Starting {
                    called_at,
                    ref mut returned_at,
                    ..
                } = self.life
                else {
                    return;
                };
                // Only now: the start signal must not wait for ~20 series to be created.
                self.tx.create_metrics();
                let metrics = self.tx.gate().metrics();
                metrics.series().scale_ups.inc();
                match result {
                    Ok(()) => {
                        let now = Instant::now();
                        *returned_at = Some(now);
                        metrics.cold_start_phase(ColdStartPhase::StartCall, (now - called_at).as_secs_f64());
                        tracing::debug!(vm = %self.handle.key(), "start call returned");
                        self.check_running();
                    }
                    Err(error) => self.fail(AdmitError::StartFailed(error.to_string().into()), true),
                }
            }
            Done::Probed => self.on_probed(),
            Done::ScaledDown(result) => self.on_scaled_down(result),
            Done::CleanedUp => {
                if !self.queue.is_empty() {
                    tracing::info!(vm = %self.handle.key(), "requests arrived during the clean-up; starting again");
                    self.start(StartKind::Boot);
                } else {
                    self.apply_pending_policy();
                }
            }
        }
    }

    fn on_status(&mut self, status: BackendStatus) {
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
    fn check_running(&mut self) {
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
    fn probe(&mut self, endpoint: Endpoint, cold: bool) {
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

    fn on_probed(&mut self) {
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
    fn release_held(&mut self, mut slot: Option<OwnedSemaphorePermit>) {
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

    /// Answers every held request with `error`.
    fn answer_held(&mut self, error: AdmitError) {
        for waiter in self.queue.drain(..) {
            let _ = waiter.reply.send(Err(error.clone()));
        }
    }

    /// A start (or re-probe) failed: answer the held requests now, and — when the VM
    /// may be half up — stop it, so it does not keep running (and costing) unseen.
    fn fail(&mut self, error: AdmitError, clean_up: bool) {
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
    fn lost(&mut self, message: String) {
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

    fn on_idle_timer(&mut self) {
        let policy = self.policy();
        let Some((action, idle_for)) = idle::plan(self.life.phase(), policy.scale_down, policy.idle_timeout) else {
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
    fn scale_down_now(&mut self, action: Action) -> Result<(), ScaleDownRefused> {
        let applicable = matches!(
            (action, self.life),
            (_, Life::Ready { .. }) | (Action::Stop, Life::Paused)
        );
        if !applicable {
            return Err(ScaleDownRefused::NotApplicable(self.life.phase(), action.as_str()));
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
    fn begin_scale_down(&mut self, action: Action, idle: bool) {
        let endpoint = match self.life {
            Life::Ready { endpoint } => Some(endpoint),
            _ => None,
        };
        self.life = Life::Stopping {
            from: self.life.phase(),
            endpoint,
        };
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

    fn on_scaled_down(&mut self, result: Result<ScaledDown, BackendError>) {
        let Life::Stopping { from, endpoint } = self.life else {
            return;
        };
        let key = self.handle.key().clone();
        let metrics = self.tx.gate().metrics();
        let (to, error) = match result {
            Ok(ScaledDown::PeerActive) => {
                tracing::info!(vm = %key, "a peer saw activity; keeping the VM");
                return self.resume_after_called_off_stop(from, endpoint);
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
        self.tx.publish(to, None, error);
        self.arm_idle_timer();
        self.apply_pending_policy();
    }

    /// The compare-and-stop found a peer's activity: back where the VM was. The next
    /// idle check waits at least `idle.check_interval`, whatever the deadline says — the
    /// peer's record may not have reached this replica's store yet, and each check can
    /// be an API call.
    fn resume_after_called_off_stop(&mut self, from: VmPhase, endpoint: Option<Endpoint>) {
        match (from, endpoint) {
            (VmPhase::Ready, Some(endpoint)) => {
                self.life = Life::Ready { endpoint };
                self.tx.publish(VmPhase::Ready, Some(endpoint), None);
            }
            _ => {
                self.life = Life::Paused;
                self.tx.publish(VmPhase::Paused, None, None);
            }
        }
        self.arm_idle_timer();
        let not_before = Instant::now() + self.handle.0.context.idle_recheck;
        self.idle_at = self.idle_at.map(|at| at.max(not_before));
        match self.life {
            Life::Ready { .. } => self.release_held(None),
            _ if !self.queue.is_empty() => self.start(StartKind::Resume),
            _ => {}
        }
    }

    /// Sets the idle timer for the current phase (none if its plan has no scale-down).
    fn arm_idle_timer(&mut self) {
        let policy = self.policy();
        self.idle_at = idle::plan(self.life.phase(), policy.scale_down, policy.idle_timeout)
            .map(|(_, idle_for)| self.tx.gate().last_activity() + idle_for);
    }

    /// A changed policy takes effect once the VM is stopped and nothing waits for it.
    fn apply_pending_policy(&mut self) {
        let stopped = matches!(self.life, Life::Stopped | Life::Failed);
        if stopped && self.op.is_none() && self.queue.is_empty() {
            if let Some(policy) = self.pending_policy.take() {
                tracing::debug!(vm = %self.handle.key(), "new policy in force");
                self.tx.set_policy(policy);
            }
        }
    }

    fn policy(&self) -> Arc<Policy> {
        self.tx.gate().policy()
    }

    /// Nothing going on: no call or probe running, nothing held, no timer that matters.
    fn is_dormant(&self) -> bool {
        self.op.is_none()
            && self.queue.is_empty()
            && self.slot_wait.is_none()
            && matches!(self.life, Life::Stopped | Life::Failed | Life::Paused)
            && self.idle_at.is_none()
    }
}

/// The backend's reason for a stop, or a generic one.
fn stopped_message(status: &BackendStatus) -> String {
    status.message.clone().unwrap_or_else(|| "the VM stopped".into())
}
