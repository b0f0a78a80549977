//! The owner of one VM's life: a task that takes events one at a time and is the only
//! code that moves the VM from phase to phase (docs/architecture.md has the diagram).
//!
//! Long because: the `Owner` struct — one documented field for everything the owner
//! tracks, each file's state included — and the loop that selects over all of them are
//! one piece; the handling itself is in the files named below.
//!
//! Events are the commands sent through the `VmHandle`, the backend's status stream,
//! the start deadline, the held requests' deadline, the idle timer, concurrency slots
//! freeing up, endpoints passing their probe, and the result of the one backend call
//! the owner runs at a time (`Done`). A start is: start call → the backend reports the
//! VM running with its endpoints → each is probed → Ready as soon as one answers, and
//! the held requests are released in arrival order, each to the least loaded endpoint
//! with a free slot. Whatever goes wrong on the way answers the held requests and stops
//! the half-started VM; requests that arrive meanwhile start it again afterwards.
//!
//! This file has the loop and the dispatch; `life.rs` the owner's states and events,
//! `up.rs` the way up (start, status, probes, release, failure, loss), `down.rs` the way
//! down (idle timer, scale-down), `warm.rs` keep-warm and pre-warm starts, `adaptive.rs`
//! the adaptive idle policy (its deadlines, its predicted starts, the history it hands
//! over), `endpoints.rs` the endpoints being probed and taking traffic.
//!
//! Owns: the phase transitions, the queue of held requests, starts, probes,
//! scale-downs. Must not import HTTP, `ingress`, `server`, `activator`, or backend
//! implementations.

mod adaptive;
mod down;
mod endpoints;
mod life;
mod timer;
mod up;
mod warm;

use life::{Done, Event, Flow, Life, ScaledDown, StartKind};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::gate::{ColdStart, GateTx};
use super::{AdmitError, Command, VmHandle, Waiter};
use crate::backend::{BackendStatus, VmEvent};
use crate::idle_policy::Plan;
use crate::metrics::ColdStartPhase;
use crate::readiness::Attempts;
use crate::vm::{Policy, VmPhase};
use endpoints::{Endpoints, Probing};
use timer::{maybe, Timer};

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
    /// The endpoints being probed and taking traffic.
    endpoints: Endpoints,
    /// Waiting for a concurrency slot for the first held request.
    slot_wait: Option<BoxFuture<'static, ()>>,
    idle_at: Option<Instant>,
    /// The current cold start's start call and boot, for its `Ready` event.
    cold_phases: (Duration, Duration),
    /// The current cold start's kind (a restore may have become a boot).
    cold_kind: StartKind,
    /// The last cold start's timeline, handed to the requests held through it.
    cold_start: Option<Arc<ColdStart>>,
    /// When to start the VM ahead of the next keep-warm window.
    warm_at: Option<Instant>,
    /// The end of the keep-warm window the VM was last started (or kept) for.
    warm_hold: Option<std::time::SystemTime>,
    /// When to start the VM ahead of the event the adaptive idle policy expects.
    prewarm_at: Option<Instant>,
    /// When an operator scaled the VM down: no pre-warm until the next activity.
    operator_stop: Option<Instant>,
    /// The adaptive plan, for one version of the learning and one lead.
    plan_cache: Option<((u64, Duration), Plan)>,
    start_timer: Timer,
    /// Each held request is answered `StartTimeout` by the owner once it has waited
    /// `start_timeout`, not by a timer of its own: one timer for the queue's first, instead
    /// of 120 bytes and a timer registration per held request.
    held_timer: Timer,
    idle_timer: Timer,
    warm_timer: Timer,
    prewarm_timer: Timer,
}

impl Owner {
    pub(super) fn new(handle: VmHandle, tx: GateTx, inbox: mpsc::UnboundedReceiver<Command>) -> Owner {
        // A new owner takes over where the last one parked the VM.
        let life = match tx.gate().phase() {
            VmPhase::Paused => Life::Paused,
            VmPhase::Hibernated => Life::Hibernated,
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
            endpoints: Endpoints::default(),
            slot_wait: None,
            idle_at: None,
            cold_phases: Default::default(),
            cold_kind: StartKind::Boot,
            cold_start: None,
            warm_at: None,
            warm_hold: None,
            prewarm_at: None,
            operator_stop: None,
            plan_cache: None,
            start_timer: Timer::new(),
            held_timer: Timer::new(),
            idle_timer: Timer::new(),
            warm_timer: Timer::new(),
            prewarm_timer: Timer::new(),
        };
        owner.arm_idle_timer();
        owner.keep_warm();
        owner.arm_prewarm();
        owner
    }

    /// Takes `first`, then events, until the VM has nothing going on (or leaves the
    /// catalog).
    pub(super) async fn run(mut self, first: Command) {
        let mut event = Event::Command(first);
        loop {
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
            event = self.next_event().await;
        }
    }

    async fn next_event(&mut self) -> Event {
        self.start_timer.set(self.start_deadline());
        self.held_timer.set(self.held_deadline());
        self.idle_timer.set(self.idle_at);
        self.warm_timer.set(self.warm_at);
        self.prewarm_timer.set(self.prewarm_at);
        tokio::select! {
            biased;
            changed = maybe(self.status.as_mut().map(|s| s.changed())) => match changed {
                Ok(()) => Event::BackendStatus,
                Err(_) => Event::StatusGone,
            },
            done = maybe(self.op.as_mut()) => Event::Done(done),
            endpoint = self.endpoints.next_passed() => Event::Probed(endpoint),
            _ = self.start_timer.fired() => Event::StartDeadline,
            _ = self.held_timer.fired() => Event::HeldExpired,
            Some(command) = self.inbox.recv() => Event::Command(command),
            () = maybe(self.slot_wait.as_mut()) => Event::Slot,
            _ = self.idle_timer.fired() => Event::IdleExpired,
            _ = self.warm_timer.fired() => Event::WarmDue,
            _ = self.prewarm_timer.fired() => Event::PrewarmDue,
        }
    }

    fn on(&mut self, event: Event) -> Flow {
        match event {
            Event::Command(command) => return self.on_command(command),
            Event::BackendStatus => {
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
                if self.start_deadline().is_some() {
                    let timeout = self.policy().start_timeout;
                    self.fail(AdmitError::StartTimeout(timeout), true);
                }
            }
            Event::HeldExpired => self.expire_held(),
            Event::IdleExpired => self.on_idle_expired(),
            Event::WarmDue => self.keep_warm(),
            Event::PrewarmDue => self.on_prewarm_due(),
            Event::Done(done) => {
                self.op = None;
                self.on_done(done);
            }
            Event::Probed(endpoint) => self.on_probed(endpoint),
            Event::Slot => {
                self.slot_wait = None;
                self.release_held();
            }
        }
        Flow::Continue
    }

    fn on_command(&mut self, command: Command) -> Flow {
        match command {
            Command::Activate(waiter) => self.activate(waiter),
            Command::Unreachable(endpoint) => self.on_unreachable(endpoint),
            Command::ScaleDown { action, reply } => {
                let _ = reply.send(self.scale_down_now(action));
            }
            Command::Warm(reply) => {
                let _ = reply.send(self.warm());
            }
            Command::CatalogChanged(policy) => {
                self.pending_policy = Some(policy);
                self.apply_pending_policy();
                self.keep_warm();
                // A stored history may have come with it (a peer's scale-down).
                self.arm_prewarm();
            }
            Command::Removed => {
                tracing::info!(vm = %self.handle.key(), "VM left the catalog");
                let message: Arc<str> = "the VM was removed from the catalog".into();
                self.answer_held(AdmitError::Stopped(message.clone()));
                self.tx.publish(VmPhase::Stopped, &[], Some(message));
                return Flow::End;
            }
            Command::RejectHeld(error) => {
                self.answer_held(error.clone());
                self.rejecting = Some(error);
            }
        }
        Flow::Continue
    }

    /// The one backend call in progress finished.
    fn on_done(&mut self, done: Done) {
        match done {
            Done::Started(result) => {
                let key = self.handle.key();
                let backend = &self.handle.0.context.backend;
                let Life::Starting {
                    called_at,
                    ref mut returned_at,
                    ref mut kind,
                    ..
                } = self.life
                else {
                    return;
                };
                // Only now: the start signal must not wait for ~20 series to be created.
                self.tx.create_metrics();
                let metrics = self.tx.gate().metrics();
                metrics.series().scale_ups.inc();
                let budget = self.tx.gate().policy().start_timeout;
                metrics.series().start_timeout.set(budget.as_secs_f64());
                match result {
                    Ok(()) => {
                        let now = Instant::now();
                        *returned_at = Some(now);
                        // A restore the backend turned into a boot (an unusable state)
                        // is counted as the boot it was.
                        if *kind == StartKind::Restore && !backend.restored(key) {
                            *kind = StartKind::Boot;
                        }
                        // A restore happens inside the start call: its whole time is the
                        // `restore` phase, not `start_call`.
                        if *kind != StartKind::Restore {
                            metrics.cold_start_phase(ColdStartPhase::StartCall, (now - called_at).as_secs_f64());
                        }
                        self.cold_phases.0 = now - called_at;
                        self.cold_kind = *kind;
                        tracing::debug!(vm = %self.handle.key(), "start call returned");
                        self.check_running();
                    }
                    Err(error) => self.fail(AdmitError::StartFailed(error.to_string().into()), true),
                }
            }
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

    /// Answers every held request with `error`.
    fn answer_held(&mut self, error: AdmitError) {
        for waiter in self.queue.drain(..) {
            let _ = waiter.reply.send(Err(error.clone()));
        }
    }

    /// A changed policy takes effect once the VM is stopped and nothing waits for it.
    fn apply_pending_policy(&mut self) {
        let stopped = matches!(self.life, Life::Stopped | Life::Failed);
        if stopped && self.op.is_none() && self.queue.is_empty() {
            if let Some(policy) = self.pending_policy.take() {
                tracing::debug!(vm = %self.handle.key(), "new policy in force");
                self.handle.sync_learning(&policy);
                self.tx.set_policy(policy);
                self.plan_cache = None;
            }
        }
    }

    /// Tells the VM's operators: one log line (INFO, WARN for failures) and whatever the
    /// backend does with it (Kubernetes: an Event on the target).
    fn record(&self, event: VmEvent) {
        let vm = self.handle.key();
        let (reason, message) = (event.reason(), event.message());
        // A start an event caused carries that event's trace id, as its own lines do.
        let trace_id = match &event {
            VmEvent::ScaledUp {
                trigger: Some(trigger), ..
            } => trigger.trace_id.as_deref(),
            _ => None,
        };
        match (event.is_warning(), trace_id) {
            (true, _) => tracing::warn!(%vm, reason, "{message}"),
            (false, Some(trace_id)) => tracing::info!(%vm, reason, trace_id, "{message}"),
            (false, None) => tracing::info!(%vm, reason, "{message}"),
        }
        self.handle.0.context.backend.record_event(vm, event);
    }

    fn policy(&self) -> Arc<Policy> {
        self.tx.gate().policy()
    }

    /// The phase readers see.
    fn phase(&self) -> VmPhase {
        match self.life {
            Life::Stopped => VmPhase::Stopped,
            Life::Failed => VmPhase::Failed,
            Life::Starting { .. } => VmPhase::Starting,
            Life::Running { .. } if self.endpoints.any_ready() => VmPhase::Ready,
            Life::Running { .. } => VmPhase::Probing,
            Life::Stopping { .. } => VmPhase::Stopping,
            Life::Paused => VmPhase::Paused,
            Life::Hibernated => VmPhase::Hibernated,
        }
    }

    /// When a start (or a VM left without an endpoint taking traffic) gives up.
    fn start_deadline(&self) -> Option<Instant> {
        match self.life {
            Life::Starting { deadline, .. } => Some(deadline),
            Life::Running { deadline, .. } if !self.endpoints.any_ready() => deadline,
            _ => None,
        }
    }

    /// Publishes the phase and the endpoints taking traffic.
    fn publish(&self) {
        self.tx.publish(self.phase(), self.endpoints.ready(), None);
    }

    /// How endpoints are probed under the policy in force.
    fn probing(&self) -> Probing {
        Probing {
            probe: self.handle.0.context.probe.clone(),
            readiness: self.policy().readiness.clone(),
            // A guest resumed or restored was serving when it was paused or saved.
            attempts: match self.cold_kind {
                StartKind::Boot => Attempts::Overlapping,
                StartKind::Resume | StartKind::Restore => Attempts::OneAtATime,
            },
        }
    }

    /// Nothing going on: no call or probe running, nothing held, no timer that matters.
    fn is_dormant(&self) -> bool {
        self.op.is_none()
            && self.queue.is_empty()
            && self.slot_wait.is_none()
            && !self.endpoints.probing()
            && matches!(
                self.life,
                Life::Stopped | Life::Failed | Life::Paused | Life::Hibernated
            )
            && self.idle_at.is_none()
            && self.warm_at.is_none()
            && self.prewarm_at.is_none()
    }
}
