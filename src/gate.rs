//! One VM's gate: its state machine (`Stopped → Starting → Probing → Ready → Stopping
//! → Stopped`, plus `Paused` and `Failed`) published on a `tokio::sync::watch` channel,
//! and the bounded FIFO of requests held while the VM is not Ready (count and bytes,
//! each with a deadline).
//!
//! Every transition happens under one small mutex (never held across an await), so
//! "exactly one start per cold start" is a compare-and-set here, not a convention.
//! The warm path takes no lock: one atomic in-flight counter and a read of the state.
//!
//! Owns: phases, held requests, in-flight counting, last activity.
//! Must not import: HTTP, axum, hyper, the backend, Kubernetes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::VmMetrics;
use crate::vm::{Endpoint, Policy, VmKey, VmPhase};

/// What observers see of a gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateState {
    /// Current phase.
    pub phase: VmPhase,
    /// The guest endpoint while Probing or Ready.
    pub endpoint: Option<Endpoint>,
    /// Why the last start failed, or why the VM stopped unexpectedly.
    pub last_error: Option<Arc<str>>,
}

/// Why a held request was not admitted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
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
    /// The VM did not become Ready before this request's deadline.
    #[error("the VM did not become ready within {0:?}")]
    StartTimeout(Duration),
    /// The VM stopped (on its own, or was stopped by someone else) while requests waited.
    #[error("the VM stopped: {0}")]
    Stopped(Arc<str>),
    /// The activator is shutting down and the drain deadline passed before the VM was ready.
    #[error("the activator is shutting down; retry elsewhere")]
    ShuttingDown,
}

/// What kind of start a winning caller must drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartKind {
    /// A cold boot from Stopped or Failed.
    Boot,
    /// A resume from Paused.
    Resume,
}

/// Handed to a held request when it is released.
pub struct Release {
    endpoint: Endpoint,
    permit: Option<OwnedSemaphorePermit>,
}

struct Waiter {
    tx: oneshot::Sender<Result<Release, GateError>>,
}

/// State guarded by the gate's mutex.
struct Parking {
    waiters: VecDeque<Waiter>,
    count: usize,
    bytes: usize,
    /// Arrival of the first request held in the current cold start (for `cold_start_seconds`).
    first_held_at: Option<Instant>,
    /// A request arrived while Stopping: start again once the stop completes.
    restart_after_stop: bool,
}

/// One VM's gate. Shared as `Arc<Gate>` by the activator, the idle scaler and requests.
pub struct Gate {
    key: VmKey,
    policy: Arc<Policy>,
    state: watch::Sender<GateState>,
    parking: Mutex<Parking>,
    /// Mirror of `Parking::count`, read lock-free by the warm path.
    held: AtomicUsize,
    in_flight: AtomicUsize,
    /// Limits requests in flight to the guest (`Policy::concurrency`); `None` = unlimited.
    limiter: Option<Arc<Semaphore>>,
    clock_base: Instant,
    /// Milliseconds since `clock_base` + 1 of the last activity; 0 = never.
    last_activity_ms: AtomicU64,
    /// Last cold start in milliseconds + 1; 0 = none yet.
    last_cold_start_ms: AtomicU64,
    /// When activity was last handed to the backend to share (ms since `clock_base` + 1).
    last_shared_ms: AtomicU64,
    metrics: VmMetrics,
}

impl Gate {
    /// A gate for a stopped VM.
    pub fn new(key: VmKey, policy: Arc<Policy>, metrics: VmMetrics) -> Arc<Gate> {
        let limiter = (policy.concurrency > 0).then(|| Arc::new(Semaphore::new(policy.concurrency)));
        let (state, _) = watch::channel(GateState {
            phase: VmPhase::Stopped,
            endpoint: None,
            last_error: None,
        });
        Arc::new(Gate {
            key,
            policy,
            state,
            parking: Mutex::new(Parking {
                waiters: VecDeque::new(),
                count: 0,
                bytes: 0,
                first_held_at: None,
                restart_after_stop: false,
            }),
            held: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            limiter,
            clock_base: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            last_cold_start_ms: AtomicU64::new(0),
            last_shared_ms: AtomicU64::new(0),
            metrics,
        })
    }

    /// The VM this gate guards.
    pub fn key(&self) -> &VmKey {
        &self.key
    }

    /// The VM's policy.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// This VM's metric handles.
    pub fn metrics(&self) -> &VmMetrics {
        &self.metrics
    }

    /// A snapshot of the current state.
    pub fn state(&self) -> GateState {
        self.state.borrow().clone()
    }

    /// The current phase.
    pub fn phase(&self) -> VmPhase {
        self.state.borrow().phase
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<GateState> {
        self.state.subscribe()
    }

    /// Requests forwarded to the guest and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Requests held (waiting for Ready or for a concurrency slot) and their body bytes.
    pub fn held(&self) -> (usize, usize) {
        let p = self.lock();
        (p.count, p.bytes)
    }

    /// When a request last entered or left this VM (the gate's creation if never).
    pub fn last_activity(&self) -> Instant {
        self.last_activity_if_any().unwrap_or(self.clock_base)
    }

    /// When a request last entered or left this VM, if one ever did.
    pub fn last_activity_if_any(&self) -> Option<Instant> {
        match self.last_activity_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.clock_base + Duration::from_millis(ms - 1)),
        }
    }

    /// Records activity now.
    pub fn touch(&self) {
        let ms = Instant::now().saturating_duration_since(self.clock_base).as_millis() as u64;
        self.last_activity_ms.fetch_max(ms + 1, Ordering::Relaxed);
    }

    /// Whether this replica should share its activity now: true at most once per `every`
    /// (a compare-and-swap, so concurrent requests claim it once).
    pub fn claim_activity_share(&self, every: Duration) -> bool {
        let now = Instant::now().saturating_duration_since(self.clock_base).as_millis() as u64 + 1;
        let last = self.last_shared_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every.as_millis() as u64 {
            return false;
        }
        self.last_shared_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Records how long the last cold start took.
    pub fn record_cold_start(&self, took: Duration) {
        self.last_cold_start_ms
            .store(took.as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// How long the last cold start took, if there was one.
    pub fn last_cold_start(&self) -> Option<Duration> {
        match self.last_cold_start_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms - 1)),
        }
    }

    /// Updates `buffered_requests` if the VM's series exist. Called under the parking
    /// lock, as `create_metrics` is, so the gauge never lags the count.
    fn set_buffered_metric(&self, count: usize) {
        if let Some(series) = self.metrics.series_if_created() {
            series.buffered.set(count as i64);
        }
    }

    /// Creates the VM's metric series (on its first start, after the start call is
    /// issued: creating ~20 series must not delay the start signal).
    pub fn create_metrics(&self) {
        let p = self.lock();
        self.metrics.series().buffered.set(p.count as i64);
    }

    fn lock(&self) -> MutexGuard<'_, Parking> {
        // A panic while holding this lock would be a bug in this file; the data stays
        // consistent (counters only), so keep serving rather than poisoning every request.
        self.parking.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, phase: VmPhase, endpoint: Option<Endpoint>, error: Option<Arc<str>>) {
        self.state.send_modify(|s| {
            s.phase = phase;
            s.endpoint = endpoint;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// The warm path: when Ready with nothing held and a concurrency slot free, the
    /// request goes straight to the guest. Lock-free.
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlightGuard> {
        let permit = match &self.limiter {
            Some(limiter) => Some(limiter.clone().try_acquire_owned().ok()?),
            None => None,
        };
        // Count first, then look: `begin_stop` checks the count under the state lock, so
        // either it sees this request or this request sees `Stopping`.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let endpoint = {
            let state = self.state.borrow();
            (state.phase == VmPhase::Ready && self.held.load(Ordering::SeqCst) == 0)
                .then_some(state.endpoint)
                .flatten()
        };
        match endpoint {
            Some(endpoint) => Some(self.entered(endpoint, permit)),
            None => {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                None
            }
        }
    }

    fn entered(self: &Arc<Self>, endpoint: Endpoint, permit: Option<OwnedSemaphorePermit>) -> InFlightGuard {
        self.metrics.series().in_flight.inc();
        self.touch();
        InFlightGuard {
            gate: self.clone(),
            endpoint,
            _permit: permit,
        }
    }

    /// The slow path: hold the request (bounded by count and bytes) until the VM is
    /// Ready and a concurrency slot is free. Returns the held request and, for exactly
    /// one caller per cold start, the start that caller must drive.
    pub fn hold(self: &Arc<Self>, body_bytes: usize) -> Result<(Held, Option<StartKind>), GateError> {
        let now = Instant::now();
        let mut p = self.lock();
        let policy = &self.policy;
        if p.count + 1 > policy.max_buffered || p.bytes + body_bytes > policy.max_buffered_bytes {
            return Err(GateError::BufferFull {
                count: p.count,
                bytes: p.bytes,
                max_count: policy.max_buffered,
                max_bytes: policy.max_buffered_bytes,
            });
        }
        p.count += 1;
        p.bytes += body_bytes;
        self.held.store(p.count, Ordering::SeqCst);
        self.set_buffered_metric(p.count);
        let ticket = HeldTicket {
            gate: self.clone(),
            bytes: body_bytes,
        };
        let deadline = now + policy.start_timeout;
        let state = self.state.borrow().clone();
        if state.phase == VmPhase::Ready {
            // Ready but saturated (or a release is under way): wait for a concurrency slot.
            let endpoint = state.endpoint.expect("Ready always has an endpoint");
            return Ok((Held::for_slot(ticket, endpoint, deadline), None));
        }
        let start = match state.phase {
            VmPhase::Stopped | VmPhase::Failed => Some(StartKind::Boot),
            VmPhase::Paused => Some(StartKind::Resume),
            VmPhase::Stopping => {
                p.restart_after_stop = true;
                None
            }
            VmPhase::Starting | VmPhase::Probing | VmPhase::Ready => None,
        };
        if start.is_some() {
            p.first_held_at = Some(now);
            self.publish(VmPhase::Starting, None, None);
        }
        if p.first_held_at.is_none() {
            p.first_held_at = Some(now);
        }
        let (tx, rx) = oneshot::channel();
        // Held requests that gave up leave a closed sender behind; drop them before the
        // queue can grow past its bound.
        if p.waiters.len() >= policy.max_buffered {
            p.waiters.retain(|w| !w.tx.is_closed());
        }
        p.waiters.push_back(Waiter { tx });
        Ok((Held::in_queue(ticket, rx, deadline), start))
    }

    /// `Starting` → `Probing`, or `Ready` → `Probing` when the guest stopped answering.
    /// Returns false if the gate is not in one of those phases.
    pub fn set_probing(&self, endpoint: Endpoint) -> bool {
        let _p = self.lock();
        match self.phase() {
            VmPhase::Starting | VmPhase::Probing | VmPhase::Ready => {
                self.publish(VmPhase::Probing, Some(endpoint), None);
                true
            }
            _ => false,
        }
    }

    /// The guest answered its probe: → `Ready`, and every held request is handed over
    /// in arrival order. Returns the queue to release and the first held request's
    /// arrival (for `cold_start_seconds`), or `None` if the gate was closed meanwhile.
    pub fn open(&self, endpoint: Endpoint) -> Option<Opened> {
        let mut p = self.lock();
        if !matches!(self.phase(), VmPhase::Starting | VmPhase::Probing) {
            return None;
        }
        self.publish(VmPhase::Ready, Some(endpoint), None);
        Some(Opened {
            waiters: std::mem::take(&mut p.waiters),
            first_held_at: p.first_held_at.take(),
            endpoint,
        })
    }

    /// A start failed: every held request gets `error`, the gate goes to `Failed` (the
    /// next request tries again).
    pub fn fail(&self, error: GateError) {
        self.close_with(VmPhase::Failed, error);
    }

    /// The VM stopped without the activator asking (crashed, powered off, or stopped by
    /// someone else): held requests get 503 and the gate goes to `Stopped`.
    pub fn lost(&self, reason: &str) {
        self.close_with(VmPhase::Stopped, GateError::Stopped(reason.into()));
    }

    fn close_with(&self, phase: VmPhase, error: GateError) {
        let waiters = {
            let mut p = self.lock();
            let message: Arc<str> = error.to_string().into();
            self.publish(phase, None, Some(message));
            p.first_held_at = None;
            std::mem::take(&mut p.waiters)
        };
        for w in waiters {
            let _ = w.tx.send(Err(error.clone()));
        }
    }

    /// The idle scaler's compare-and-set: `Ready` (or `Paused`, for pause-then-stop)
    /// → `Stopping`, only if nothing is in flight or held and the last activity is at
    /// least `idle_for` old. Returns the phase the VM was in when it succeeded.
    pub fn begin_stop(&self, idle_for: Duration) -> Option<VmPhase> {
        let p = self.lock();
        let from = self.phase();
        if !matches!(from, VmPhase::Ready | VmPhase::Paused) || p.count > 0 {
            return None;
        }
        if Instant::now().saturating_duration_since(self.last_activity()) < idle_for {
            return None;
        }
        let mut closed = false;
        self.state.send_if_modified(|s| {
            // Under the state's write lock: a warm request either counted itself before
            // this check, or will read `Stopping` after it.
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                // The endpoint is kept: `abort_stop` reopens the gate on it.
                s.phase = VmPhase::Stopping;
                closed = true;
            }
            closed
        });
        if closed {
            Some(from)
        } else {
            None
        }
    }

    /// The stop was called off (a peer replica saw activity): `Stopping` → `Ready` on the
    /// same endpoint. Returns the requests held meanwhile, for release.
    pub fn abort_stop(&self) -> Option<Opened> {
        let mut p = self.lock();
        let state = self.state();
        let endpoint = state.endpoint.filter(|_| state.phase == VmPhase::Stopping)?;
        p.restart_after_stop = false;
        p.first_held_at = None;
        self.publish(VmPhase::Ready, Some(endpoint), None);
        Some(Opened {
            waiters: std::mem::take(&mut p.waiters),
            first_held_at: None,
            endpoint,
        })
    }

    /// Answers every request held for Ready with `error`, leaving the phase as it is
    /// (the drain deadline passed).
    pub fn reject_held(&self, error: GateError) {
        let waiters = std::mem::take(&mut self.lock().waiters);
        for w in waiters {
            let _ = w.tx.send(Err(error.clone()));
        }
    }

    /// The stop (or pause) completed: → `to`. If requests arrived meanwhile, the gate
    /// goes straight to `Starting` and the caller must drive that start.
    pub fn finish_stop(&self, to: VmPhase) -> Option<StartKind> {
        let mut p = self.lock();
        if self.phase() != VmPhase::Stopping {
            return None;
        }
        let restart = std::mem::take(&mut p.restart_after_stop) || p.count > 0;
        if restart {
            p.first_held_at.get_or_insert_with(Instant::now);
            self.publish(VmPhase::Starting, None, None);
            Some(if to == VmPhase::Paused {
                StartKind::Resume
            } else {
                StartKind::Boot
            })
        } else {
            self.publish(to, None, None);
            None
        }
    }
}

/// What `Gate::open` hands to the caller that releases held requests.
pub struct Opened {
    waiters: VecDeque<Waiter>,
    /// Arrival of the first request held during this start, if any.
    pub first_held_at: Option<Instant>,
    endpoint: Endpoint,
}

impl Opened {
    /// Releases held requests in arrival order, each once a concurrency slot is free.
    pub async fn release(self, gate: &Gate) {
        for waiter in self.waiters {
            if waiter.tx.is_closed() {
                continue;
            }
            let permit = match &gate.limiter {
                // The semaphore is never closed, so acquire cannot fail.
                Some(limiter) => limiter.clone().acquire_owned().await.ok(),
                None => None,
            };
            let _ = waiter.tx.send(Ok(Release {
                endpoint: self.endpoint,
                permit,
            }));
        }
    }

    /// How many requests are waiting to be released.
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }
}

/// Counts a held request against the gate's bounds until dropped.
struct HeldTicket {
    gate: Arc<Gate>,
    bytes: usize,
}

impl Drop for HeldTicket {
    fn drop(&mut self) {
        let mut p = self.gate.lock();
        p.count -= 1;
        p.bytes -= self.bytes;
        self.gate.held.store(p.count, Ordering::SeqCst);
        self.gate.set_buffered_metric(p.count);
    }
}

enum HeldWait {
    Queue(oneshot::Receiver<Result<Release, GateError>>),
    Slot(Endpoint),
}

/// A request held by the gate. Await [`Held::admitted`] to get in.
pub struct Held {
    ticket: HeldTicket,
    wait: HeldWait,
    deadline: Instant,
}

impl Held {
    fn in_queue(ticket: HeldTicket, rx: oneshot::Receiver<Result<Release, GateError>>, deadline: Instant) -> Held {
        Held {
            ticket,
            wait: HeldWait::Queue(rx),
            deadline,
        }
    }

    fn for_slot(ticket: HeldTicket, endpoint: Endpoint, deadline: Instant) -> Held {
        Held {
            ticket,
            wait: HeldWait::Slot(endpoint),
            deadline,
        }
    }

    /// Waits until the VM is Ready and this request may go in, or its deadline passes.
    pub async fn admitted(self) -> Result<InFlightGuard, GateError> {
        let gate = self.ticket.gate.clone();
        let timeout = gate.policy.start_timeout;
        let release = match self.wait {
            HeldWait::Queue(rx) => match tokio::time::timeout_at(self.deadline, rx).await {
                Ok(Ok(result)) => result?,
                // The sender was dropped without an answer: only when the gate itself
                // went away (the VM was removed from the catalog).
                Ok(Err(_)) => return Err(GateError::Stopped("the VM was removed".into())),
                Err(_) => return Err(GateError::StartTimeout(timeout)),
            },
            // Without a concurrency limit a Ready gate admits at once (the request only
            // missed the warm path because a release was under way).
            HeldWait::Slot(endpoint) => match gate.limiter.clone() {
                None => Release { endpoint, permit: None },
                Some(limiter) => match tokio::time::timeout_at(self.deadline, limiter.acquire_owned()).await {
                    Ok(permit) => Release {
                        endpoint,
                        permit: permit.ok(),
                    },
                    Err(_) => return Err(GateError::StartTimeout(timeout)),
                },
            },
        };
        gate.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = gate.entered(release.endpoint, release.permit);
        drop(self.ticket);
        Ok(guard)
    }
}

/// One request in flight to the guest. Dropping it records activity and frees the
/// concurrency slot; keep it alive until the response body has been streamed.
pub struct InFlightGuard {
    gate: Arc<Gate>,
    endpoint: Endpoint,
    _permit: Option<OwnedSemaphorePermit>,
}

impl InFlightGuard {
    /// Where to send the request.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The gate this request went through.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }
}

impl std::fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightGuard")
            .field("vm", &self.gate.key)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.gate.touch();
        self.gate.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.gate.metrics.series().in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn gate_with(policy: Policy) -> Arc<Gate> {
        let metrics = Metrics::new();
        let key = VmKey::new("ns", "vm");
        Gate::new(key.clone(), Arc::new(policy), metrics.vm(&key))
    }

    fn gate() -> Arc<Gate> {
        gate_with(Policy {
            max_buffered: 3,
            max_buffered_bytes: 100,
            start_timeout: Duration::from_secs(10),
            ..Policy::default()
        })
    }

    fn addr() -> Endpoint {
        "127.0.0.1:9".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn exactly_one_caller_wins_the_start() {
        let gate = gate();
        let (_a, start_a) = gate.hold(1).unwrap();
        let (_b, start_b) = gate.hold(1).unwrap();
        assert_eq!(start_a, Some(StartKind::Boot));
        assert_eq!(start_b, None);
        assert_eq!(gate.phase(), VmPhase::Starting);
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_are_bounded_by_count_and_bytes() {
        let gate = gate();
        let _a = gate.hold(60).unwrap();
        assert!(matches!(gate.hold(50), Err(GateError::BufferFull { bytes: 60, .. })));
        let _b = gate.hold(40).unwrap();
        let _c = gate.hold(0).unwrap();
        assert!(matches!(gate.hold(0), Err(GateError::BufferFull { count: 3, .. })));
        drop(_a);
        assert_eq!(gate.held(), (2, 40));
        assert!(gate.hold(0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn open_releases_every_held_request_in_order() {
        let gate = gate();
        let (a, _) = gate.hold(1).unwrap();
        let (b, _) = gate.hold(1).unwrap();
        assert!(gate.try_enter().is_none(), "not Ready yet");
        assert!(gate.set_probing(addr()));
        let opened = gate.open(addr()).unwrap();
        assert_eq!(opened.len(), 2);
        opened.release(&gate).await;
        let ga = a.admitted().await.unwrap();
        let gb = b.admitted().await.unwrap();
        assert_eq!(gate.in_flight(), 2);
        assert_eq!(gate.held(), (0, 0));
        drop((ga, gb));
        assert_eq!(gate.in_flight(), 0);
        let warm = gate.try_enter().expect("warm path once Ready");
        assert_eq!(warm.endpoint(), addr());
    }

    #[tokio::test(start_paused = true)]
    async fn failure_answers_every_held_request_and_allows_a_retry() {
        let gate = gate();
        let (a, _) = gate.hold(1).unwrap();
        gate.fail(GateError::StartFailed("no such image".into()));
        assert!(matches!(a.admitted().await, Err(GateError::StartFailed(m)) if m.contains("image")));
        assert_eq!(gate.phase(), VmPhase::Failed);
        assert_eq!(gate.held(), (0, 0));
        let (_b, start) = gate.hold(1).unwrap();
        assert_eq!(start, Some(StartKind::Boot), "the next request retries the start");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_times_out_at_its_deadline() {
        let gate = gate();
        let (a, _) = gate.hold(1).unwrap();
        let err = a.admitted().await.unwrap_err();
        assert_eq!(err, GateError::StartTimeout(Duration::from_secs(10)));
        assert_eq!(gate.held(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn begin_stop_needs_idleness_and_nothing_in_flight() {
        let gate = gate();
        let (held, _) = gate.hold(1).unwrap();
        gate.open(addr()).unwrap().release(&gate).await;
        let guard = held.admitted().await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(gate.begin_stop(Duration::from_secs(30)), None, "in flight");
        drop(guard); // touches: activity is now
        assert_eq!(gate.begin_stop(Duration::from_secs(30)), None, "not idle yet");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(gate.begin_stop(Duration::from_secs(30)), Some(VmPhase::Ready));
        assert!(gate.try_enter().is_none(), "closed gate admits nothing");
        assert_eq!(gate.finish_stop(VmPhase::Stopped), None);
        assert_eq!(gate.state().endpoint, None);
        assert_eq!(gate.phase(), VmPhase::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_stopping_restarts_the_vm_afterwards() {
        let gate = gate();
        gate.hold(1).unwrap();
        gate.open(addr()).unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(gate.begin_stop(Duration::from_secs(30)).is_some());
        let (held, start) = gate.hold(1).unwrap();
        assert_eq!(start, None, "no start while stopping");
        assert_eq!(gate.finish_stop(VmPhase::Stopped), Some(StartKind::Boot));
        assert_eq!(gate.phase(), VmPhase::Starting);
        gate.open(addr()).unwrap().release(&gate).await;
        assert!(held.admitted().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_stop_reopens_the_gate_and_releases_what_arrived_meanwhile() {
        let gate = gate();
        gate.hold(1).unwrap();
        gate.open(addr()).unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(gate.begin_stop(Duration::from_secs(30)).is_some());
        let (held, start) = gate.hold(1).unwrap();
        assert_eq!(start, None);
        let opened = gate.abort_stop().expect("was stopping");
        assert_eq!(gate.phase(), VmPhase::Ready);
        opened.release(&gate).await;
        assert_eq!(held.admitted().await.unwrap().endpoint(), addr());
        assert!(gate.try_enter().is_some(), "warm again");
        assert!(gate.abort_stop().is_none(), "only from Stopping");
    }

    #[tokio::test(start_paused = true)]
    async fn activity_is_shared_at_most_once_per_interval() {
        let gate = gate();
        let every = Duration::from_secs(3);
        assert!(gate.claim_activity_share(every));
        assert!(!gate.claim_activity_share(every));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!gate.claim_activity_share(every));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(gate.claim_activity_share(every));
    }

    #[tokio::test(start_paused = true)]
    async fn rejecting_held_requests_answers_them_and_keeps_the_phase() {
        let gate = gate();
        let (a, _) = gate.hold(1).unwrap();
        gate.reject_held(GateError::ShuttingDown);
        assert_eq!(a.admitted().await.unwrap_err(), GateError::ShuttingDown);
        assert_eq!(gate.phase(), VmPhase::Starting);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_vm_resumes_instead_of_booting() {
        let gate = gate();
        gate.hold(1).unwrap();
        gate.open(addr()).unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        gate.begin_stop(Duration::from_secs(30)).unwrap();
        gate.finish_stop(VmPhase::Paused);
        let (_held, start) = gate.hold(1).unwrap();
        assert_eq!(start, Some(StartKind::Resume));
    }

    #[tokio::test(start_paused = true)]
    async fn lost_vm_answers_held_requests() {
        let gate = gate();
        let (a, _) = gate.hold(1).unwrap();
        gate.lost("qemu exited with status 1");
        assert!(matches!(a.admitted().await, Err(GateError::Stopped(m)) if m.contains("qemu")));
        assert_eq!(gate.phase(), VmPhase::Stopped);
        assert!(gate.state().last_error.unwrap().contains("qemu"));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limits_release_and_warm_path() {
        let gate = gate_with(Policy {
            concurrency: 1,
            max_buffered: 10,
            start_timeout: Duration::from_secs(5),
            ..Policy::default()
        });
        let (a, _) = gate.hold(0).unwrap();
        let (b, _) = gate.hold(0).unwrap();
        let opened = gate.open(addr()).unwrap();
        let g2 = gate.clone();
        let releaser = tokio::spawn(async move { opened.release(&g2).await });
        let ga = a.admitted().await.unwrap();
        assert!(gate.try_enter().is_none(), "the only slot is taken");
        let b_task = tokio::spawn(b.admitted());
        tokio::task::yield_now().await;
        assert!(!b_task.is_finished(), "second request waits for the slot");
        drop(ga);
        let gb = b_task.await.unwrap().unwrap();
        releaser.await.unwrap();
        // Saturated warm request is held for a slot, not rejected.
        let (c, start) = gate.hold(0).unwrap();
        assert_eq!(start, None);
        let c_task = tokio::spawn(c.admitted());
        drop(gb);
        assert!(c_task.await.unwrap().is_ok());
    }
}
