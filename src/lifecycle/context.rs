//! What every VM's owner works with: the backend, the guest probe, the idle rules (the
//! re-check interval, the default idle policy and the adaptive policy's settings), the
//! drain flag and the wall clock (keep-warm schedules, idle histories; tests swap it for
//! one that follows tokio's paused clock), and the runtime owners run on. Process-wide,
//! shared by all owners.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backend::Backend;
use crate::idle_policy::{IdlePolicy, Settings};
use crate::readiness::GuestProbe;
use crate::vm::Policy;

/// How idle VMs are scaled down (config section `idle`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleRules {
    /// How often an idle VM that is still busy (a long request in flight) is re-checked.
    pub recheck: Duration,
    /// The idle policy of VMs whose own policy does not choose one.
    pub default_policy: IdlePolicy,
    /// The adaptive policy's settings.
    pub adaptive: Settings,
}

impl IdleRules {
    /// The fixed idle timeout for every VM that does not choose otherwise, re-checked
    /// every `recheck`.
    pub fn fixed(recheck: Duration) -> IdleRules {
        IdleRules {
            recheck,
            default_policy: IdlePolicy::Fixed,
            adaptive: Settings::default(),
        }
    }

    /// The idle policy `policy` runs under.
    pub fn policy_of(&self, policy: &Policy) -> IdlePolicy {
        policy.idle_policy.unwrap_or(self.default_policy)
    }
}

/// What every VM's owner works with: the process-wide side effects and settings.
pub struct Context {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) probe: Arc<dyn GuestProbe>,
    /// How idle VMs are scaled down.
    pub(super) idle: IdleRules,
    draining: AtomicBool,
    /// The wall clock keep-warm schedules are read on (tests run one off tokio's paused
    /// clock).
    pub(super) wall_clock: WallClock,
    /// The runtime the context was made on, where owners and other tasks that outlive a
    /// request run: a request may be served on another (an ingress worker thread's),
    /// which ends before the owners do when the activator stops.
    runtime: Option<tokio::runtime::Handle>,
}

/// Where the wall-clock time comes from.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

impl Context {
    /// Owners over `backend`, probing guests with `probe`, scaling idle VMs down by `idle`.
    pub fn new(backend: Arc<dyn Backend>, probe: Arc<dyn GuestProbe>, idle: IdleRules) -> Arc<Context> {
        Self::with_wall_clock(backend, probe, idle, Arc::new(SystemTime::now))
    }

    /// As [`Context::new`], reading the wall clock from `wall_clock`.
    pub fn with_wall_clock(
        backend: Arc<dyn Backend>,
        probe: Arc<dyn GuestProbe>,
        idle: IdleRules,
        wall_clock: WallClock,
    ) -> Arc<Context> {
        Arc::new(Context {
            backend,
            probe,
            idle,
            draining: AtomicBool::new(false),
            wall_clock,
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Runs `task` on the runtime the context was made on (the caller's, if it was made
    /// outside one).
    pub(super) fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.runtime {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// Polls `task` once on this thread, as if it ran on the context's runtime (its
    /// timers, I/O and spawns belong there), with a waker that does nothing: whatever it
    /// waits for must be polled again — by the task it is spawned as next.
    pub(super) fn poll_once<F: std::future::Future>(&self, task: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let _runtime = self.runtime.as_ref().map(|runtime| runtime.enter());
        task.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// From now on new requests get [`super::AdmitError::Draining`]; held and in-flight ones go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether `start_draining` was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
