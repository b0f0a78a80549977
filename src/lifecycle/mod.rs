//! The life of one VM, from catalog entry to removal, owned by one task.
//!
//! Long because: `VmHandle` is one type whose methods are the whole of what the rest
//! of the process may ask of a VM (admit or hold, scale down, warm, sync the catalog,
//! share activity), beside the commands and errors they speak to the owner.
//!
//! Everything that may change a VM's phase is a command to its owner (`owner.rs`):
//! requests asking to be let in (`Activate`), a guest found unreachable, an explicit
//! stop or pause, a changed or removed catalog entry, the drain deadline — and, from
//! inside, the backend's status stream, the start deadline, the idle timer and the
//! results of the backend calls and probes it runs. The owner is the only writer of the
//! VM's [`Gate`]; everybody else reads it. A request on the warm path never talks to the
//! owner: it counts itself in at the gate (one atomic) and goes.
//!
//! The owner's task runs only while the VM has something going on (starting, running,
//! stopping, held requests, a timer): a stopped VM costs no task, which is what lets
//! thousands of registered VMs cost little. The next command starts it again: on the
//! sender's thread until it first waits, then as a task (`VmHandle::send`).
//!
//! See docs/architecture.md for the state diagram.
//!
//! Owns: [`VmHandle`] (what the registry, ingress and admin hold), the owner task, the
//! gate. Must not import HTTP frameworks, `ingress`, `server`, `activator`, or any
//! backend implementation (only the `backend` trait).

mod context;
mod gate;
mod idle;
mod learning;
mod owner;
#[cfg(test)]
mod tests;

pub use context::{Context, IdleRules, WallClock};

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use gate::{ColdStart, ColdStartPhaseSpan, Gate, Held, Permit, VmState};
pub use idle::Action;
pub use learning::IdleDecision;

use crate::backend::Trigger;
use crate::metrics::VmMetrics;
use crate::vm::{Endpoint, Policy, VmKey, VmPhase};
use gate::{GateTx, Release};
use learning::Learning;

/// Why a request was not let in. The ingress turns these into 503s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// The per-VM held count or byte bound is reached.
    #[error("{count} requests ({bytes} bytes) are already held for this VM, the limit is {max_count} requests / {max_bytes} bytes")]
    BufferFull {
        /// Requests held now.
        count: usize,
        /// Body bytes held now.
        bytes: usize,
        /// The count bound.
        max_count: usize,
        /// The byte bound.
        max_bytes: usize,
    },
    /// The backend refused or failed to start the VM.
    #[error("the VM failed to start: {0}")]
    StartFailed(Arc<str>),
    /// The VM did not become Ready before the request's deadline.
    #[error("the VM did not become ready within {0:?}")]
    StartTimeout(Duration),
    /// The VM stopped (on its own, was stopped by someone else, or left the catalog)
    /// while the request waited.
    #[error("the VM stopped: {0}")]
    Stopped(Arc<str>),
    /// The activator is shutting down: retry elsewhere.
    #[error("the activator is shutting down; retry elsewhere")]
    Draining,
    /// The VM is not ready and the backend cannot act now (its API is unreachable): no
    /// start is tried and nothing is held.
    #[error("the VM is not ready and its backend is unreachable; retry later")]
    BackendUnavailable,
}

/// Why an explicit stop or pause was not begun.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScaleDownRefused {
    /// Requests are in flight or held: they are served first.
    #[error("the VM is busy: {in_flight} requests in flight, {held} held")]
    Busy {
        /// Requests in flight.
        in_flight: usize,
        /// Requests held.
        held: usize,
    },
    /// The VM is not in a phase this action applies to.
    #[error("the VM is {0}; {1} applies to a ready VM")]
    NotApplicable(VmPhase, &'static str),
    /// The VM left the catalog.
    #[error("the VM was removed")]
    Removed,
}

/// What the rest of the process asks of a VM's owner.
enum Command {
    /// A request that missed the warm path wants in. It has reserved its place among
    /// the held requests already.
    Activate(Waiter),
    /// A request found the guest unreachable at this endpoint (→ re-probe).
    Unreachable(Endpoint),
    /// Stop or pause now, without waiting for the idle timeout.
    ScaleDown {
        action: Action,
        reply: oneshot::Sender<Result<(), ScaleDownRefused>>,
    },
    /// Start the VM now if it is not running or on its way (a pre-warm: nothing held,
    /// nothing delivered); answered with the phase once the start is issued.
    Warm(oneshot::Sender<Result<VmPhase, AdmitError>>),
    /// The VM's catalog entry changed; the policy takes effect when the VM is stopped.
    CatalogChanged(Arc<Policy>),
    /// The VM left the catalog: answer held requests, end.
    Removed,
    /// The drain deadline passed: answer held requests (and any later ones) with this.
    RejectHeld(AdmitError),
}

/// A held request, queued at the owner in arrival order.
struct Waiter {
    reply: oneshot::Sender<Result<Release, AdmitError>>,
    arrived: Instant,
    /// The event, when it may be the one that starts the VM (it found it at rest).
    /// Boxed: most held events come once the start is under way and carry none, and the
    /// queue is as long as `max_buffered` (a waiter is 32 bytes, not 96).
    trigger: Option<Box<Trigger>>,
}

/// Where a VM's owner is: running (its command channel) or not (its gate's write side,
/// waiting for the next owner).
struct OwnerSlot {
    commands: Option<mpsc::UnboundedSender<Command>>,
    task: Option<AbortHandle>,
    dormant: Option<GateTx>,
    removed: bool,
    /// The process is stopping: an owner still on its way to its task is not started.
    aborted: bool,
    /// Owners of this VM that panicked so far (a bug): the pause before the next one
    /// takes over by itself doubles with each (`take_over_after_panic`).
    panics: u32,
}

struct HandleInner {
    gate: Gate,
    context: Arc<Context>,
    owner: Mutex<OwnerSlot>,
    /// What this replica learned of the VM's idle times, while it runs under the adaptive
    /// idle policy. Never held across an await.
    learning: Mutex<Option<Box<Learning>>>,
}

/// One VM as the rest of the process sees it: its gate (read side) and the way to its
/// owner. Cheap to clone.
///
/// The owner's channel is unbounded, and bounded by construction: every `Activate`
/// holds a reserved place among the VM's held requests (`max_buffered`), every
/// `Unreachable` a request in flight, and the other commands come once per catalog
/// change, drain or admin request.
#[derive(Clone)]
pub struct VmHandle(Arc<HandleInner>);

impl VmHandle {
    /// A stopped VM with `policy`. No task runs until the first command.
    pub fn new(key: VmKey, policy: Arc<Policy>, metrics: VmMetrics, context: Arc<Context>) -> VmHandle {
        let (gate, tx) = Gate::new(key, policy.clone(), metrics);
        let handle = VmHandle(Arc::new(HandleInner {
            gate,
            context,
            owner: Mutex::new(OwnerSlot {
                commands: None,
                task: None,
                dormant: Some(tx),
                removed: false,
                aborted: false,
                panics: 0,
            }),
            learning: Mutex::new(None),
        }));
        handle.sync_learning(&policy);
        handle
    }

    /// The VM's gate: its published state and counters.
    pub fn gate(&self) -> &Gate {
        &self.0.gate
    }

    /// The VM.
    pub fn key(&self) -> &VmKey {
        self.0.gate.key()
    }

    /// Lets one request of `body_bytes` in: at once when the VM is Ready (the warm path,
    /// lock-free), otherwise held — starting the VM if it is not running — until it is
    /// Ready and a concurrency slot is free, it fails, or `start_timeout` passes.
    pub async fn admit(&self, body_bytes: usize) -> Result<Permit, AdmitError> {
        self.admit_event(body_bytes, Trigger::default).await
    }

    /// As [`VmHandle::admit`], naming the event (`trigger`, called only when the VM is
    /// at rest and this request may be the one that starts it) for the `ScaledUp` Event.
    pub async fn admit_event(
        &self,
        body_bytes: usize,
        trigger: impl FnOnce() -> Trigger,
    ) -> Result<Permit, AdmitError> {
        match self.try_admit()? {
            Some(permit) => Ok(permit),
            None => self.hold(body_bytes, trigger).await,
        }
    }

    /// The warm path of [`VmHandle::admit_event`]: a permit when the request may go in
    /// at once, `None` when it has to be held ([`VmHandle::hold`]).
    pub fn try_admit(&self) -> Result<Option<Permit>, AdmitError> {
        if self.0.context.is_draining() {
            return Err(AdmitError::Draining);
        }
        let gate = &self.0.gate;
        if let Some(idle_since) = gate.note_arrival() {
            self.learn_from_arrival(idle_since);
        }
        if let Some(permit) = gate.try_enter() {
            self.share_activity(None);
            return Ok(Some(permit));
        }
        Ok(None)
    }

    /// Holds a request [`VmHandle::try_admit`] did not let in — starting the VM if it
    /// is not running — until it is Ready and a concurrency slot is free, it fails, or
    /// `start_timeout` passes.
    pub async fn hold(&self, body_bytes: usize, trigger: impl FnOnce() -> Trigger) -> Result<Permit, AdmitError> {
        let gate = &self.0.gate;
        // Held requests wait for a start, a probe or a slot; with the backend unreachable
        // a VM that is not Ready will not get there: say so now, not at the start timeout.
        if !self.0.context.backend.is_connected() && gate.state().phase != VmPhase::Ready {
            return Err(AdmitError::BackendUnavailable);
        }
        let ticket = gate.reserve(body_bytes)?;
        let arrived = Instant::now();
        let (reply, answer) = oneshot::channel();
        let at_rest = matches!(
            gate.state().phase,
            VmPhase::Stopped | VmPhase::Paused | VmPhase::Hibernated | VmPhase::Failed
        );
        let trigger = at_rest.then(|| Box::new(trigger()));
        if self
            .send(Command::Activate(Waiter {
                reply,
                arrived,
                trigger,
            }))
            .is_err()
        {
            return Err(AdmitError::Stopped("the VM was removed".into()));
        }
        tracing::debug!(vm = %self.key(), "request held");
        // The owner answers in time: a release, a failure, or `StartTimeout` once this
        // request has waited `start_timeout` (see `Owner::expire_held`).
        let release = match answer.await {
            Ok(result) => result?,
            // The owner ended without answering: the VM left the catalog, shutdown, or
            // the owner panicked (the next request's owner takes over: 503, try again).
            Err(_) if self.0.context.is_draining() => return Err(AdmitError::Draining),
            Err(_) if self.lock_slot().removed => return Err(AdmitError::Stopped("the VM was removed".into())),
            Err(_) => return Err(AdmitError::Stopped("the VM's owner failed; try again".into())),
        };
        let permit = gate.admit_released(ticket, release, arrived);
        self.share_activity(Some(arrived));
        Ok(permit)
    }

    /// A request found the guest at `endpoint` unreachable (connection refused or
    /// reset): no more traffic to that endpoint until a probe passes again.
    pub fn report_unreachable(&self, endpoint: Endpoint) {
        let state = self.0.gate.state();
        if state.phase == VmPhase::Ready && state.targets.iter().any(|t| t.endpoint() == endpoint) {
            let _ = self.send(Command::Unreachable(endpoint));
        }
    }

    /// Stops or pauses the VM now instead of at its idle timeout. Refused while requests
    /// are in flight or held. Returns once the scale-down has begun.
    pub async fn scale_down(&self, action: Action) -> Result<(), ScaleDownRefused> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ScaleDown { action, reply })
            .map_err(|_| ScaleDownRefused::Removed)?;
        answer.await.unwrap_or(Err(ScaleDownRefused::Removed))
    }

    /// Starts the VM now unless it is running or on its way — a pre-warm: nothing is
    /// delivered, and its idle timeout counts from now. Returns the phase once the start
    /// is issued; refused while draining or after the drain deadline.
    pub async fn warm(&self) -> Result<VmPhase, AdmitError> {
        if self.0.context.is_draining() {
            return Err(AdmitError::Draining);
        }
        let (reply, answer) = oneshot::channel();
        let removed = || AdmitError::Stopped("the VM was removed from the catalog".into());
        self.send(Command::Warm(reply)).map_err(|_| removed())?;
        answer.await.unwrap_or_else(|_| Err(removed()))
    }

    /// The VM's catalog entry has a new policy. Only the registry calls this. A stored
    /// idle history is taken at once; the rest takes effect when the VM is next stopped.
    pub(crate) fn set_policy(&self, policy: Arc<Policy>) {
        if self.lock_learning().is_some() {
            self.sync_learning(&policy);
        }
        let _ = self.send(Command::CatalogChanged(policy));
    }

    /// The VM left the catalog: held requests are answered, the owner ends, and later
    /// requests through this handle are refused. Only the registry calls this.
    pub(crate) fn remove(&self) {
        let mut slot = self.lock_slot();
        slot.removed = true;
        if let Some(commands) = slot.commands.take() {
            let _ = commands.send(Command::Removed);
        }
        slot.dormant = None;
    }

    /// Answers every held request with `error` (the drain deadline passed). Only the
    /// registry calls this.
    pub(crate) fn reject_held(&self, error: AdmitError) {
        let slot = self.lock_slot();
        if let Some(commands) = &slot.commands {
            let _ = commands.send(Command::RejectHeld(error));
        }
    }

    /// Ends the owner task at once, whatever it was doing (process shutdown).
    pub(crate) fn abort(&self) {
        let mut slot = self.lock_slot();
        slot.removed = true;
        slot.aborted = true;
        slot.commands = None;
        if let Some(task) = slot.task.take() {
            task.abort();
        }
    }

    /// Whether the owner task is running (tests).
    pub fn owner_running(&self) -> bool {
        self.lock_slot().commands.is_some()
    }

    fn lock_slot(&self) -> MutexGuard<'_, OwnerSlot> {
        // Never held across an await; the slot stays consistent whatever panicked.
        self.0.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `command` to the owner, starting it if it is not running. Sends happen
    /// under the slot's lock, so an owner that decides to end (under the same lock)
    /// never leaves a command behind.
    ///
    /// A new owner takes its first command on the caller's thread: its first steps — a
    /// cold start's start call among them — run here, in the owner runtime's context,
    /// until the owner first waits; only then is it spawned there. Spawned at once, the
    /// start call would wait for a thread of that runtime to wake (the request is served
    /// on an ingress worker thread): the start signal's one cross-thread hop.
    fn send(&self, command: Command) -> Result<(), ()> {
        let mut slot = self.lock_slot();
        if slot.removed {
            return Err(());
        }
        let command = match &slot.commands {
            Some(commands) => match commands.send(command) {
                Ok(()) => return Ok(()),
                // The owner task is gone without ending properly (a bug): start anew
                // if its gate can still be written, else refuse.
                Err(mpsc::error::SendError(command)) => command,
            },
            None => command,
        };
        let tx = match slot.dormant.take() {
            Some(tx) => tx,
            // No owner and no parked write side, yet the VM is in the catalog: its owner
            // ended without retiring — it panicked, in its task or in its first steps
            // here, and its future is gone. A new owner takes over (`take_over_from_panicked`).
            None if !self.0.context.is_draining() => self.take_over_from_panicked(),
            None => return Err(()),
        };
        let (commands, inbox) = mpsc::unbounded_channel();
        // Commands sent from now on wait in the inbox until the owner takes them.
        slot.commands = Some(commands);
        drop(slot);
        let handle = self.clone();
        let mut owner = Box::pin(async move { owner::Owner::new(handle, tx, inbox).run(command).await });
        // A panic stays the owner's, as it would in its task: the caller's request (or
        // connection) goes on, and the requests the owner held are answered by its end.
        let first = std::panic::catch_unwind(AssertUnwindSafe(|| self.0.context.poll_once(owner.as_mut())));
        match first {
            // It did what it was asked and retired (or ended) without waiting.
            Ok(Poll::Ready(())) => return Ok(()),
            Ok(Poll::Pending) => {}
            Err(_) => {
                self.take_over_after_panic();
                return Ok(());
            }
        }
        // Spawned under the lock: the owner may retire as soon as it runs, and does so
        // under the same lock, after its task is recorded here.
        let mut slot = self.lock_slot();
        let handle = self.clone();
        let task = self.0.context.spawn(async move {
            if AssertUnwindSafe(owner).catch_unwind().await.is_err() {
                handle.take_over_after_panic();
            }
        });
        if slot.aborted {
            task.abort();
        } else {
            slot.task = Some(task.abort_handle());
        }
        Ok(())
    }

    /// An owner panicked (a bug) — in its first steps or in its task. Its VM must not be
    /// left as it was until some request comes: a running VM would run on with no idle
    /// timer to stop it. After a pause — 1 s, doubling with each panic of this VM's
    /// owners up to 256 s, so a backend call that panics every time is retried as a
    /// crash loop is, not in a tight one — a new owner takes over unless one has
    /// meanwhile (a request's, which takes over at once) or the VM is at rest or failed
    /// (it costs nothing as it is; the next command takes over). It starts the VM again
    /// — a no-op for a VM still running — and from there the idle timeout stops it.
    fn take_over_after_panic(&self) {
        let panics = {
            let mut slot = self.lock_slot();
            slot.panics = slot.panics.saturating_add(1);
            slot.panics
        };
        tracing::error!(vm = %self.key(), panics, "the VM's owner panicked");
        let pause = Duration::from_secs(1 << (panics - 1).min(8));
        let handle = self.clone();
        self.0.context.spawn(async move {
            tokio::time::sleep(pause).await;
            let orphaned = {
                let slot = handle.lock_slot();
                let owned = slot.commands.as_ref().is_some_and(|c| !c.is_closed()) || slot.dormant.is_some();
                !owned && !slot.removed
            };
            let at_rest = matches!(
                handle.0.gate.phase(),
                VmPhase::Stopped | VmPhase::Paused | VmPhase::Hibernated | VmPhase::Failed
            );
            if orphaned && !at_rest && !handle.0.context.is_draining() {
                let (reply, _) = oneshot::channel();
                let _ = handle.send(Command::Warm(reply));
            }
        });
    }

    /// The write side of the gate for an owner taking over from one that panicked. A VM
    /// the gate shows at rest (stopped, paused, hibernated, failed) is taken over as it
    /// is; one the dead owner was moving (starting, ready, stopping…) is parked as failed,
    /// with the reason, so the next request starts it again — a start of a VM that is
    /// already running is a no-op for every backend — rather than being refused for the
    /// rest of the process's life.
    fn take_over_from_panicked(&self) -> GateTx {
        let gate = &self.0.gate;
        let tx = GateTx::take_over(gate);
        let phase = gate.phase();
        tracing::error!(vm = %self.key(), ?phase, "the VM's owner ended unexpectedly; a new one takes over");
        if !matches!(
            phase,
            VmPhase::Stopped | VmPhase::Paused | VmPhase::Hibernated | VmPhase::Failed
        ) {
            let reason: Arc<str> = "the VM's owner failed (a bug); the VM is started again".into();
            tx.publish(VmPhase::Failed, &[], Some(reason));
        }
        tx
    }

    /// Called by an owner with nothing left to do. Under the slot's lock: if a command
    /// arrived meanwhile it is returned (and the owner goes on); otherwise the gate's
    /// write side is parked for the next owner and the owner ends.
    fn retire(&self, inbox: &mut mpsc::UnboundedReceiver<Command>, tx: GateTx) -> Result<(), (GateTx, Command)> {
        let mut slot = self.lock_slot();
        match inbox.try_recv() {
            Ok(command) => Err((tx, command)),
            Err(_) => {
                slot.commands = None;
                slot.task = None;
                if !slot.removed {
                    slot.dormant = Some(tx);
                }
                Ok(())
            }
        }
    }

    /// Hands this replica's activity to the backend so peers see it — at most once per
    /// `idle_timeout / 10` per VM, never once per event (one atomic on the warm path).
    /// A held event's activity is recorded as of its arrival (`arrived`), not its release
    /// after the cold start: peers running the adaptive policy count from arrivals.
    fn share_activity(&self, arrived: Option<Instant>) {
        let gate = &self.0.gate;
        let wall = || SystemTime::now() - arrived.map_or(Duration::ZERO, |at| at.elapsed());
        let Some(now) = gate.claim_activity_share(wall) else {
            return;
        };
        let (backend, key) = (self.0.context.backend.clone(), self.key().clone());
        self.0.context.spawn(async move {
            if let Err(error) = backend.record_activity(&key, now).await {
                tracing::debug!(vm = %key, %error, "could not record activity");
            }
        });
    }
}
