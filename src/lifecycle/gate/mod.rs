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
//! Owns: the published state (with the endpoints taking traffic, `target.rs`), in-flight
//! counting, the bounds on held requests, the activity clock.
//! Must not import: HTTP, the backend, Kubernetes, `owner`.
//!
//! Long because: the read side and the write side share one `Inner`, and are kept in
//! one file so that what only the writer may do (publish, take over) is seen next to it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

mod admission;
mod arrivals;
mod rejections;
mod target;

pub(in crate::lifecycle) use admission::Release;
pub use admission::{ColdStart, ColdStartPhaseSpan, Held, Permit};
pub use target::Target;
pub(in crate::lifecycle) use target::{take, Taken};

use crate::metrics::VmMetrics;
use crate::vm::{Endpoint, Policy, VmKey, VmPhase};

/// What readers see of a VM: its phase, where its guest answers, why it last failed,
/// and the policy it runs under.
#[derive(Clone, Debug)]
pub struct VmState {
    /// Current phase.
    pub phase: VmPhase,
    /// The endpoints taking traffic (probed), while Ready — and while Stopping, in case
    /// the stop is called off.
    pub targets: Arc<[Arc<Target>]>,
    /// Why the last start failed, or why the VM stopped unexpectedly.
    pub last_error: Option<Arc<str>>,
    /// The policy in force. A changed policy takes effect when the VM is next stopped.
    pub policy: Arc<Policy>,
}

impl VmState {
    /// The first endpoint taking traffic, if any.
    pub fn endpoint(&self) -> Option<Endpoint> {
        self.targets.first().map(|t| t.endpoint())
    }
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
    /// The wall-clock time (Unix ms) of the activity this replica last shared: a shared
    /// record no later than this is this replica's own.
    last_shared_wall_ms: AtomicU64,
    /// The adaptive policy's bin (ms) while the VM learns its idle times; 0 = it does not.
    sample_bin_ms: AtomicU64,
    /// Milliseconds since `clock_base` + 1 of the last arrival; 0 = never.
    last_arrival_ms: AtomicU64,
    /// Started ahead of an expected event that has not come yet.
    prewarmed: AtomicBool,
    /// A concurrency slot was freed while requests were held (the owner waits on it).
    slot_freed: Notify,
    metrics: VmMetrics,
    /// The burst of refusals being logged, if any.
    rejections: rejections::Rejections,
}

/// The read side of a VM's gate, and its door: cheap to clone.
#[derive(Clone)]
pub struct Gate(Arc<Inner>);

/// The write side of a VM's gate. Only the VM's owner holds one.
pub(super) struct GateTx(Gate);

fn share_every_ms(policy: &Policy) -> u64 {
    (policy.idle_timeout / 10).as_millis() as u64
}

impl Gate {
    /// A closed gate for a stopped VM, and its write side.
    pub(super) fn new(key: VmKey, policy: Arc<Policy>, metrics: VmMetrics) -> (Gate, GateTx) {
        let share_every = share_every_ms(&policy);
        let (state, _) = watch::channel(VmState {
            phase: VmPhase::Stopped,
            targets: Arc::new([]),
            last_error: None,
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
            last_shared_wall_ms: AtomicU64::new(0),
            sample_bin_ms: AtomicU64::new(0),
            last_arrival_ms: AtomicU64::new(0),
            prewarmed: AtomicBool::new(false),
            slot_freed: Notify::new(),
            metrics,
            rejections: Default::default(),
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

    /// Whether this replica should share its activity now: the time to share (read from
    /// `wall`, and remembered as its own) at most once per tenth of the idle timeout (a
    /// compare-and-swap, so concurrent requests claim it once); `None` otherwise, without
    /// reading the wall clock.
    pub(super) fn claim_activity_share(&self, wall: impl FnOnce() -> SystemTime) -> Option<SystemTime> {
        // Called right after a request entered, which stamped its activity: that stamp is
        // "now" here, without reading the clock again.
        let now = self.0.last_activity_ms.load(Ordering::Relaxed).max(1);
        let last = self.0.last_shared_ms.load(Ordering::Relaxed);
        let every = self.0.share_every_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every {
            return None;
        }
        self.0
            .last_shared_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        let wall = wall();
        let ms = wall.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        self.0.last_shared_wall_ms.fetch_max(ms, Ordering::Relaxed);
        Some(wall)
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
}

impl GateTx {
    /// The write side of `gate` again, for the owner that takes over from one that ended
    /// without handing it back (it panicked: the write side went down with it). Only
    /// when that owner is gone — its task ended or its future was dropped — so that
    /// there is still one writer.
    pub(super) fn take_over(gate: &Gate) -> GateTx {
        GateTx(gate.clone())
    }

    /// The read side.
    pub(super) fn gate(&self) -> &Gate {
        &self.0
    }

    fn inner(&self) -> &Inner {
        &(self.0).0
    }

    /// Publishes a phase and the endpoints taking traffic; the last error is kept unless
    /// `error` replaces it.
    pub(super) fn publish(&self, phase: VmPhase, targets: &[Arc<Target>], error: Option<Arc<str>>) {
        self.inner().state.send_modify(|s| {
            s.phase = phase;
            s.targets = targets.into();
            if error.is_some() {
                s.last_error = error;
            }
        });
    }

    /// Puts a new policy in force.
    pub(super) fn set_policy(&self, policy: Arc<Policy>) {
        let inner = self.inner();
        inner.share_every_ms.store(share_every_ms(&policy), Ordering::Relaxed);
        inner.state.send_modify(|s| s.policy = policy);
    }

    /// Resolves when a request gives back a slot of a limited endpoint while requests
    /// are held (a notification that came while nobody waited is kept for the next wait).
    pub(super) fn slot_freed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let gate = self.0.clone();
        async move { gate.0.slot_freed.notified().await }
    }

    /// Closes a Ready (or Paused, or Hibernated) gate for a scale-down — `Stopping` — only if nothing
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
            let open = matches!(s.phase, VmPhase::Ready | VmPhase::Paused | VmPhase::Hibernated);
            if open && inner.in_flight.load(Ordering::SeqCst) == 0 {
                s.phase = VmPhase::Stopping;
                return true;
            }
            false
        })
    }

    /// Records activity now (an operator's start, a pre-warm CloudEvent: the idle timeout
    /// — and the adaptive plan, as from an arrival — counts from it).
    pub(super) fn touch(&self) {
        let gate = self.gate();
        gate.touch();
        let now = gate.since_base_ms() + 1;
        self.inner().last_arrival_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// The VM is being started ahead of an expected event.
    pub(super) fn set_prewarmed(&self) {
        self.inner().prewarmed.store(true, Ordering::Relaxed);
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// A gate for `ns/vm` under `policy`, and its write side.
    pub(in crate::lifecycle) fn gate_with(policy: Policy) -> (Gate, GateTx) {
        let key = VmKey::new("ns", "vm");
        Gate::new(key.clone(), Arc::new(policy), Metrics::new().vm(&key))
    }

    /// A guest endpoint.
    pub(in crate::lifecycle) fn addr() -> Endpoint {
        "127.0.0.1:9".parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn closing_for_a_scale_down_needs_nothing_in_flight_or_held() {
        let (gate, tx) = gate_with(Policy::default());
        tx.publish(VmPhase::Ready, &[Target::new(addr(), 0)], None);
        let permit = gate.try_enter().unwrap();
        assert!(!tx.close_if_idle(), "in flight");
        drop(permit);
        let ticket = gate.reserve(0).unwrap();
        assert!(!tx.close_if_idle(), "held");
        drop(ticket);
        assert!(tx.close_if_idle());
        assert_eq!(gate.phase(), VmPhase::Stopping);
        assert_eq!(gate.state().endpoint(), Some(addr()), "kept for a called-off stop");
        assert!(gate.try_enter().is_none(), "a closed gate admits nothing");
        assert!(!tx.close_if_idle(), "only from Ready or Paused");
    }

    #[tokio::test(start_paused = true)]
    async fn activity_is_shared_at_most_once_per_interval() {
        let (gate, _tx) = gate_with(Policy {
            idle_timeout: Duration::from_secs(30),
            ..Policy::default()
        });
        // As requests do: activity stamped on entering, then the claim.
        let claim = || {
            gate.touch();
            gate.claim_activity_share(SystemTime::now)
        };
        assert!(claim().is_some());
        assert!(claim().is_none());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(claim().is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(claim().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_policy_is_in_force_at_once() {
        let (gate, tx) = gate_with(Policy::default());
        tx.set_policy(Arc::new(Policy {
            concurrency: 2,
            ..Policy::default()
        }));
        assert_eq!(gate.policy().concurrency, 2);
    }
}
