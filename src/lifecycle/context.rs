//! What every VM's owner works with: the backend, the guest probe, the idle re-check
//! interval, the drain flag and the wall clock (keep-warm schedules; tests swap it for
//! one that follows tokio's paused clock). Process-wide, shared by all owners.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::backend::Backend;
use crate::readiness::GuestProbe;

/// What every VM's owner works with: the process-wide side effects and settings.
pub struct Context {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) probe: Arc<dyn GuestProbe>,
    /// How often an idle VM that is still busy (a long request in flight) is re-checked.
    pub(super) idle_recheck: Duration,
    draining: AtomicBool,
    /// The wall clock keep-warm schedules are read on (tests run one off tokio's paused
    /// clock).
    pub(super) wall_clock: WallClock,
}

/// Where the wall-clock time comes from.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

impl Context {
    /// Owners over `backend`, probing guests with `probe`.
    pub fn new(backend: Arc<dyn Backend>, probe: Arc<dyn GuestProbe>, idle_recheck: Duration) -> Arc<Context> {
        Self::with_wall_clock(backend, probe, idle_recheck, Arc::new(SystemTime::now))
    }

    /// As [`Context::new`], reading the wall clock from `wall_clock`.
    pub fn with_wall_clock(
        backend: Arc<dyn Backend>,
        probe: Arc<dyn GuestProbe>,
        idle_recheck: Duration,
        wall_clock: WallClock,
    ) -> Arc<Context> {
        Arc::new(Context {
            backend,
            probe,
            idle_recheck,
            draining: AtomicBool::new(false),
            wall_clock,
        })
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
