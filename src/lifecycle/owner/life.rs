//! The owner's states and inputs: where the VM is in its life (`Life`), the kind of
//! start it needs, the one backend call in progress (`Done`), how a scale-down ended,
//! and the events the loop takes (`Event`).

use tokio::time::Instant;

use crate::backend::BackendError;
use crate::lifecycle::Command;
use crate::metrics::ColdStartPhase;
use crate::vm::{Endpoint, VmPhase};

/// What kind of start the VM needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StartKind {
    /// A boot from Stopped or Failed.
    Boot,
    /// A resume from Paused.
    Resume,
    /// A restore from Hibernated (the backend boots instead if the state is unusable).
    Restore,
}

impl StartKind {
    /// The cold-start phase the time from the start call to running counts as.
    pub(super) fn phase(self) -> ColdStartPhase {
        match self {
            StartKind::Boot => ColdStartPhase::Boot,
            StartKind::Resume => ColdStartPhase::Resume,
            StartKind::Restore => ColdStartPhase::Restore,
        }
    }
}

/// Where the VM is in its life, with what each phase needs to remember.
#[derive(Clone, Copy, Debug)]
pub(super) enum Life {
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
        kind: StartKind,
    },
    /// The backend reports it running: Ready while an endpoint takes traffic, else
    /// Probing (its endpoints are probed).
    Running {
        /// Part of a cold start: no endpoint has passed its probe yet.
        cold: bool,
        /// When the backend reported it running (for the probe phase of a cold start).
        since: Instant,
        /// While no endpoint takes traffic: when to give up (`start_timeout`).
        deadline: Option<Instant>,
    },
    Stopping {
        /// Where the VM was; a stop that is called off goes back there.
        from: VmPhase,
    },
    Paused,
    Hibernated,
}

/// The one backend call in progress, with what it returns.
pub(super) enum Done {
    Started(Result<(), BackendError>),
    ScaledDown(Result<ScaledDown, BackendError>),
    CleanedUp,
}

/// How a scale-down ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ScaledDown {
    Stopped,
    Paused,
    Hibernated,
    /// Another replica saw activity meanwhile: the VM keeps running.
    PeerActive,
}

/// One input of the owner: a command from outside, or something it waited for.
pub(super) enum Event {
    /// From a `VmHandle`: `Activate`, `Unreachable`, `ScaleDown` (Stop, Pause, Hibernate),
    /// `CatalogChanged`, `Removed`, `RejectHeld`.
    Command(Command),
    /// The backend's status stream has news.
    BackendStatus,
    /// The backend dropped the VM's status stream.
    StatusGone,
    /// The start (or re-probe) took longer than `start_timeout`.
    StartDeadline,
    /// The first held request has waited `start_timeout`.
    HeldExpired,
    /// The idle timer fired.
    IdleExpired,
    /// The keep-warm timer fired: a window begins soon.
    WarmDue,
    /// The pre-warm timer fired: the adaptive idle policy expects an event soon.
    PrewarmDue,
    /// The backend call in progress finished.
    Done(Done),
    /// This endpoint passed its probe.
    Probed(Endpoint),
    /// A concurrency slot may have freed up for the first held request.
    Slot,
}

/// Whether the owner goes on after an event.
#[derive(PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    End,
}
