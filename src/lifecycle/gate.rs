//! One VM's gate: what everyone may read of the VM's life, and the lock-free door of
//! the warm path. Split as linkerd2-proxy's gate is: [`Gate`] is the read side
//! (ingress, admin, metrics, the registry), [`GateTx`] the write side, held only by the
//! VM's owner task (`owner.rs`) — the one place that moves a VM from phase to phase.
//!
//! The published [`VmState`] lives on a `tokio::sync::watch` channel. The warm path
//! reads it and counts itself in flight with one atomic; it never waits for the owner.
//! Held requests reserve their place against the per-VM bounds here (count and body
//! bytes) before they queue at the owner, so the bound holds however far the owner lags.
//!
//! Owns: the published state, in-flight counting, the concurrency limiter, the bounds
//! on held requests, the activity clock.
//! Must not import: HTTP, the backend, Kubernetes, `owner`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::AdmitError;
use crate::metrics::VmMetrics;
use crate::vm::{Endpoint, Policy, VmKey, VmPhase};

/// What readers see of a VM: its phase, where its guest answers, why it last failed,
/// and the policy it runs under.
#[derive(Clone, Debug)]
pub struct VmState {
    /// Current phase.
    pub phase: VmPhase,
    /// The guest endpoint while Probing or Ready (kept while Stopping, in case the stop
    /// is called off).
    pub endpoint: Option<Endpoint>,
    /// Why the last start failed, or why the VM stopped unexpectedly.
    pub last_error: Option<Arc<str>>,
    /// The policy in force. A changed policy takes effect when the VM is next stopped.
    pub policy: Arc<Policy>,
    /// Limits requests in flight to the guest (`Policy::concurrency`); `None` = unlimited.
    limiter: Option<Arc<Semaphore>>,
}

/// Held requests' share of the per-VM bounds.
#[derive(Default)]
struct HeldCounts {
    count: usize,
    bytes: usize,
}

struct Inner {
    key: VmKey,
    state: watch::Sender<VmState>,
    in_flight: AtomicUsize,
    held: Mutex<HeldCounts>,
    /// Mirror of `held.count`, read lock-free by the warm path and the idle check.
    held_count: AtomicUsize,
    clock_base: Instant,
    /// Milliseconds since `clock_base` + 1 of the last activity; 0 = never.
    last_activity_ms: AtomicU64,
    /// Last cold start in milliseconds + 1; 0 = none yet.
    last_cold_start_ms: AtomicU64,
    /// When activity was last handed to the backend to share (ms since `clock_base` + 1).
    last_shared_ms: AtomicU64,
    /// Activity is shared at most this often: a tenth of the idle timeout (ms).
    share_every_ms: AtomicU64,
    metrics: VmMetrics,
}

/// The read side of a VM's gate, and its door: cheap to clone.
#[derive(Clone)]
pub struct Gate(Arc<Inner>);

/// The write side of a VM's gate. Only the VM's owner holds one.
pub(super) struct GateTx(Gate);

/// A request's place among the VM's held requests (count and body bytes), given back
/// when dropped.
pub(super) struct HeldTicket {
    gate: Gate,
    bytes: usize,
}

/// What the owner hands a held request when it may go in.
pub(super) struct Release {
    pub(super) endpoint: Endpoint,
    pub(super) slot: Option<OwnedSemaphorePermit>,
}

fn limiter_for(policy: &Policy) -> Option<Arc<Semaphore>> {
    (policy.concurrency > 0).then(|| Arc::new(Semaphore::new(policy.concurrency)))
}

fn share_every_ms(policy: &Policy) -> u64 {
    (policy.idle_timeout / 10).as_millis() as u64
}

impl Gate {
    /// A closed gate for a stopped VM, and its write side.
    pub(super) fn new(key: VmKey, policy: Arc<Policy>, metrics: VmMetrics) -> (Gate, GateTx) {
        let share_every = share_every_ms(&policy);
        let (state, _) = watch::channel(VmState {
            phase: VmPhase::Stopped,
            endpoint: None,
            last_error: None,
            limiter: limiter_for(&policy),
            policy,
        });
        let gate = Gate(Arc::new(Inner {
            key,
            state,
            in_flight: AtomicUsize::new(0),
            held: Mutex::new(HeldCounts::default()),
            held_count: AtomicUsize::new(0),
            clock_base: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            last_cold_start_ms: AtomicU64::new(0),
            last_shared_ms: AtomicU64::new(0),
            share_every_ms: AtomicU64::new(share_every),
            metrics,
        }));
        (gate.clone(), GateTx(gate))
    }

    /// The VM this gate guards.
    pub fn key(&self) -> &VmKey {
        &self.0.key
    }

    /// A snapshot of the published state.
    pub fn state(&self) -> VmState {
        self.0.state.borrow().clone()
    }

    /// The current phase.
    pub fn phase(&self) -> VmPhase {
        self.0.state.borrow().phase
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.0.state.borrow().policy.clone()
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<VmState> {
        self.0.state.subscribe()
    }

    /// This VM's metric handles.
    pub fn metrics(&self) -> &VmMetrics {
        &self.0.metrics
    }

    /// Requests forwarded to the guest and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    /// Requests held (waiting for Ready or for a concurrency slot) and their body bytes.
    pub fn held(&self) -> (usize, usize) {
        let held = self.lock_held();
        (held.count, held.bytes)
    }

    /// Whether any request is held (lock-free).
    pub fn has_held(&self) -> bool {
        self.0.held_count.load(Ordering::SeqCst) > 0
    }

    /// When a request last entered or left this VM (the gate's creation if never).
    pub fn last_activity(&self) -> Instant {
        self.last_activity_if_any().unwrap_or(self.0.clock_base)
    }

    /// When a request last entered or left this VM, if one ever did.
    pub fn last_activity_if_any(&self) -> Option<Instant> {
        match self.0.last_activity_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.0.clock_base + Duration::from_millis(ms - 1)),
        }
    }

    /// How long the last cold start took, if there was one.
    pub fn last_cold_start(&self) -> Option<Duration> {
        match self.0.last_cold_start_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms - 1)),
        }
    }

    fn since_base_ms(&self) -> u64 {
        Instant::now().saturating_duration_since(self.0.clock_base).as_millis() as u64
    }

    fn touch(&self) {
        self.0
            .last_activity_ms
            .fetch_max(self.since_base_ms() + 1, Ordering::Relaxed);
    }

    /// Whether this replica should share its activity now: true at most once per tenth
    /// of the idle timeout (a compare-and-swap, so concurrent requests claim it once).
    pub(super) fn claim_activity_share(&self) -> bool {
        let now = self.since_base_ms() + 1;
        let last = self.0.last_shared_ms.load(Ordering::Relaxed);
        let every = self.0.share_every_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every {
            return false;
        }
        self.0
            .last_shared_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    fn lock_held(&self) -> MutexGuard<'_, HeldCounts> {
        // Never held across an await, and only counters inside: a panic elsewhere cannot
        // leave them inconsistent, so keep serving rather than poisoning every request.
        self.0.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates `buffered_requests` if the VM's series exist. Called under the held
    /// lock, as `GateTx::create_metrics` is, so the gauge never lags the count.
    fn set_buffered_metric(&self, count: usize) {
        if let Some(series) = self.0.metrics.series_if_created() {
            series.buffered.set(count as i64);
        }
    }

    /// The warm path: when Ready with nothing held and a concurrency slot free, the
    /// request goes straight to the guest. Lock-free: the owner is not involved.
    pub(super) fn try_enter(&self) -> Option<Permit> {
        // Count first, then look: `GateTx::close_if_idle` checks the count under the
        // state's write lock, so either it sees this request or this request sees the
        // gate closed.
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        let entered = {
            let state = self.0.state.borrow();
            match state.endpoint {
                Some(endpoint) if state.phase == VmPhase::Ready && !self.has_held() => match &state.limiter {
                    None => Some((endpoint, None)),
                    Some(limiter) => limiter
                        .clone()
                        .try_acquire_owned()
                        .ok()
                        .map(|slot| (endpoint, Some(slot))),
                },
                _ => None,
            }
        };
        match entered {
            Some((endpoint, slot)) => Some(self.entered(endpoint, slot)),
            None => {
                self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
                None
            }
        }
    }

    /// Counts a request already counted in `in_flight` as entered.
    fn entered(&self, endpoint: Endpoint, slot: Option<OwnedSemaphorePermit>) -> Permit {
        self.0.metrics.series().in_flight.inc();
        self.touch();
        Permit {
            gate: self.clone(),
            endpoint,
            _slot: slot,
        }
    }

    /// Reserves a held request's place against the VM's bounds (count and body bytes).
    pub(super) fn reserve(&self, body_bytes: usize) -> Result<HeldTicket, AdmitError> {
        let policy = self.policy();
        let mut held = self.lock_held();
        if held.count + 1 > policy.max_buffered || held.bytes + body_bytes > policy.max_buffered_bytes {
            return Err(AdmitError::BufferFull {
                count: held.count,
                bytes: held.bytes,
                max_count: policy.max_buffered,
                max_bytes: policy.max_buffered_bytes,
            });
        }
        held.count += 1;
        held.bytes += body_bytes;
        self.0.held_count.store(held.count, Ordering::SeqCst);
        self.set_buffered_metric(held.count);
        Ok(HeldTicket {
            gate: self.clone(),
            bytes: body_bytes,
        })
    }

    /// A held request was released by the owner: it is in flight from now on, and its
    /// place among the held requests is given back (in that order, so the idle check
    /// never sees it in neither).
    pub(super) fn admit_released(&self, ticket: HeldTicket, release: Release) -> Permit {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        let permit = self.entered(release.endpoint, release.slot);
        drop(ticket);
        permit
    }
}

impl Drop for HeldTicket {
    fn drop(&mut self) {
        let mut held = self.gate.lock_held();
        held.count -= 1;
        held.bytes -= self.bytes;
        self.gate.0.held_count.store(held.count, Ordering::SeqCst);
        self.gate.set_buffered_metric(held.count);
    }
}

impl GateTx {
    /// The read side.
    pub(super) fn gate(&self) -> &Gate {
        &self.0
    }

    fn inner(&self) -> &Inner {
        &(self.0).0
    }

    /// Publishes a phase and endpoint; the last error is kept unless `error` replaces it.
    pub(super) fn publish(&self, phase: VmPhase, endpoint: Option<Endpoint>, error: Option<Arc<str>>) {
        self.inner().state.send_modify(|s| {
            s.phase = phase;
            s.endpoint = endpoint;
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Puts a new policy in force (and a concurrency limiter sized for it).
    pub(super) fn set_policy(&self, policy: Arc<Policy>) {
        let inner = self.inner();
        inner.share_every_ms.store(share_every_ms(&policy), Ordering::Relaxed);
        inner.state.send_modify(|s| {
            s.limiter = limiter_for(&policy);
            s.policy = policy;
        });
    }

    /// The concurrency limiter held requests are released through.
    pub(super) fn limiter(&self) -> Option<Arc<Semaphore>> {
        self.inner().state.borrow().limiter.clone()
    }

    /// Closes a Ready (or Paused) gate for a scale-down — `Stopping` — only if nothing
    /// is in flight or held. Returns whether it closed.
    pub(super) fn close_if_idle(&self) -> bool {
        let inner = self.inner();
        if self.0.has_held() {
            return false;
        }
        inner.state.send_if_modified(|s| {
            // Under the state's write lock: a warm request either counted itself before
            // this check, or will read `Stopping` after it. The endpoint is kept: a stop
            // that is called off reopens the gate on it.
            let open = matches!(s.phase, VmPhase::Ready | VmPhase::Paused);
            if open && inner.in_flight.load(Ordering::SeqCst) == 0 {
                s.phase = VmPhase::Stopping;
                return true;
            }
            false
        })
    }

    /// Records how long the last cold start took.
    pub(super) fn record_cold_start(&self, took: Duration) {
        self.inner()
            .last_cold_start_ms
            .store(took.as_millis() as u64 + 1, Ordering::Relaxed);
    }

    /// Creates the VM's metric series (on its first start, after the start call is
    /// issued: creating ~20 series must not delay the start signal).
    pub(super) fn create_metrics(&self) {
        let held = self.0.lock_held();
        self.inner().metrics.series().buffered.set(held.count as i64);
    }
}

/// One request in flight to the guest. Dropping it records activity and frees the
/// concurrency slot; keep it alive until the response body has been streamed.
pub struct Permit {
    gate: Gate,
    endpoint: Endpoint,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Permit {
    /// Where to send the request.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("vm", self.gate.key())
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.touch();
        self.gate.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.gate.0.metrics.series().in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn gate_with(policy: Policy) -> (Gate, GateTx) {
        let key = VmKey::new("ns", "vm");
        Gate::new(key.clone(), Arc::new(policy), Metrics::new().vm(&key))
    }

    fn addr() -> Endpoint {
        "127.0.0.1:9".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn held_requests_are_bounded_by_count_and_bytes() {
        let (gate, _tx) = gate_with(Policy {
            max_buffered: 3,
            max_buffered_bytes: 100,
            ..Policy::default()
        });
        let a = gate.reserve(60).unwrap();
        assert!(matches!(
            gate.reserve(50),
            Err(AdmitError::BufferFull { bytes: 60, .. })
        ));
        let _b = gate.reserve(40).unwrap();
        let _c = gate.reserve(0).unwrap();
        assert!(matches!(gate.reserve(0), Err(AdmitError::BufferFull { count: 3, .. })));
        drop(a);
        assert_eq!(gate.held(), (2, 40));
        assert!(gate.reserve(0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_warm_path_needs_ready_nothing_held_and_a_free_slot() {
        let (gate, tx) = gate_with(Policy {
            concurrency: 1,
            ..Policy::default()
        });
        assert!(gate.try_enter().is_none(), "stopped");
        tx.publish(VmPhase::Ready, Some(addr()), None);
        let ticket = gate.reserve(0).unwrap();
        assert!(gate.try_enter().is_none(), "held requests go first");
        drop(ticket);
        let first = gate.try_enter().expect("warm");
        assert_eq!((first.endpoint(), gate.in_flight()), (addr(), 1));
        assert!(gate.try_enter().is_none(), "the only slot is taken");
        assert_eq!(gate.in_flight(), 1, "a refused request is not counted");
        drop(first);
        assert_eq!(gate.in_flight(), 0);
        assert!(gate.last_activity_if_any().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn closing_for_a_scale_down_needs_nothing_in_flight_or_held() {
        let (gate, tx) = gate_with(Policy::default());
        tx.publish(VmPhase::Ready, Some(addr()), None);
        let permit = gate.try_enter().unwrap();
        assert!(!tx.close_if_idle(), "in flight");
        drop(permit);
        let ticket = gate.reserve(0).unwrap();
        assert!(!tx.close_if_idle(), "held");
        drop(ticket);
        assert!(tx.close_if_idle());
        assert_eq!(gate.phase(), VmPhase::Stopping);
        assert_eq!(gate.state().endpoint, Some(addr()), "kept for a called-off stop");
        assert!(gate.try_enter().is_none(), "a closed gate admits nothing");
        assert!(!tx.close_if_idle(), "only from Ready or Paused");
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_request_is_in_flight_before_it_stops_counting_as_held() {
        let (gate, _tx) = gate_with(Policy::default());
        let ticket = gate.reserve(5).unwrap();
        let permit = gate.admit_released(
            ticket,
            Release {
                endpoint: addr(),
                slot: None,
            },
        );
        assert_eq!((gate.in_flight(), gate.held()), (1, (0, 0)));
        drop(permit);
        assert_eq!(gate.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_is_shared_at_most_once_per_interval() {
        let (gate, _tx) = gate_with(Policy {
            idle_timeout: Duration::from_secs(30),
            ..Policy::default()
        });
        assert!(gate.claim_activity_share());
        assert!(!gate.claim_activity_share());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!gate.claim_activity_share());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(gate.claim_activity_share());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_policy_brings_its_own_limiter() {
        let (gate, tx) = gate_with(Policy::default());
        assert!(tx.limiter().is_none());
        tx.set_policy(Arc::new(Policy {
            concurrency: 2,
            ..Policy::default()
        }));
        assert_eq!(tx.limiter().unwrap().available_permits(), 2);
        assert_eq!(gate.policy().concurrency, 2);
    }
}
