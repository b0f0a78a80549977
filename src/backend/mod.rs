//! The `Backend` trait: what runs VMs. Everything above it (lifecycle, activator,
//! ingress) is shared and knows nothing of QEMU or Kubernetes.
//!
//! A backend publishes a *catalog* (which VMs exist and their policies) and, per VM,
//! a *status* stream of `{phase, endpoints}`; each VM's owner (`lifecycle`) drives starts
//! and stops and decides readiness itself by probing the guest.
//!
//! Implementations: `qemu` (local processes, always built), `kubevirt` (cargo feature
//! `kubevirt`, on by default) and `fake` (feature `test-support`: tests and benches only,
//! never in a release build).
//!
//! Owns: the trait, [`BackendStatus`], [`BackendError`].
//! Implementations depend on this module, `vm` and their config section only —
//! never on `lifecycle`, `activator`, `ingress` or `server`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::vm::{Endpoint, Policy, VmKey};
pub use event::{Trigger, VmEvent};

mod event;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
#[cfg(feature = "kubevirt")]
pub mod kubevirt;
pub mod qemu;

/// Which VMs a backend can run, with their policies.
/// Policies are shared (`Arc`) with the gates built from them: one copy per VM.
pub type Catalog = Arc<BTreeMap<VmKey, Arc<Policy>>>;

/// What the backend itself knows of a VM (the activator adds probing and readiness).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendPhase {
    /// Not running.
    Stopped,
    /// Asked to start (or resume); not running yet.
    Starting,
    /// Running; the endpoints are where the guest application should answer.
    Running,
    /// Suspended in memory.
    Paused,
    /// Saved to disk and not running (costs disk only); the next start continues the
    /// guest from there.
    Hibernated,
    /// Asked to stop; not stopped yet.
    Stopping,
}

/// One status update from the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStatus {
    /// What the VM is doing.
    pub phase: BackendPhase,
    /// Where the guest application answers while Running (or Paused): one address for a
    /// VM, the ready pods' addresses for a scaled workload. The activator probes each
    /// before it takes traffic.
    pub endpoints: Vec<Endpoint>,
    /// Why the VM is in this phase, when that is news (e.g. the exit status of a crashed VM).
    pub message: Option<String>,
}

impl BackendStatus {
    /// A stopped VM.
    pub fn stopped() -> Self {
        Self {
            phase: BackendPhase::Stopped,
            endpoints: Vec::new(),
            message: None,
        }
    }

    /// A running VM whose guest answers at `endpoint`.
    pub fn running(endpoint: Endpoint) -> Self {
        Self {
            phase: BackendPhase::Running,
            endpoints: vec![endpoint],
            message: None,
        }
    }
}

/// What a conditional stop did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// The VM was stopped (or was already stopping).
    Stopped,
    /// Another replica recorded activity (or started the VM) meanwhile: it keeps running.
    PeerActive,
}

/// An admin verb on a VM (`POST /v1/vms/{ns}/{name}/{verb}`), for access reviews.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminVerb {
    /// Start now.
    Start,
    /// Stop now.
    Stop,
    /// Pause now.
    Pause,
    /// Hibernate now.
    Hibernate,
}

impl AdminVerb {
    /// The verb as in the route.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminVerb::Start => "start",
            AdminVerb::Stop => "stop",
            AdminVerb::Pause => "pause",
            AdminVerb::Hibernate => "hibernate",
        }
    }
}

/// What an access review decided about the caller of an admin verb.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// The token is valid and its user may do this.
    Allowed {
        /// Who the token belongs to.
        user: String,
    },
    /// The token is not valid (→ 401).
    Unauthenticated(String),
    /// The token is valid but its user may not do this (→ 403).
    Forbidden {
        /// Who the token belongs to.
        user: String,
        /// Why not, as the reviewer says.
        reason: String,
    },
}

/// What went wrong in a backend call. `metric_label` gives a bounded label value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend does not know this VM.
    #[error("VM {0} is not known to the backend")]
    NotFound(VmKey),
    /// The backend cannot be reached (API server down, emulator missing).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend refused or failed the operation.
    #[error("{op} failed: {message}")]
    Failed {
        /// The operation: start, stop, pause, resume or hibernate.
        op: &'static str,
        /// What happened.
        message: String,
    },
    /// The backend does not support this operation (e.g. pause without the subresource).
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
}

impl BackendError {
    /// A short, bounded label for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BackendError::NotFound(_) => "not_found",
            BackendError::Unavailable(_) => "unavailable",
            BackendError::Failed { .. } => "failed",
            BackendError::Unsupported(_) => "unsupported",
        }
    }
}

/// Runs VMs. Implementations: `qemu` (local processes), `fake` (tests, benches) and,
/// in a cluster, KubeVirt.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The VMs this backend can run; the receiver sees every change.
    fn catalog(&self) -> watch::Receiver<Catalog>;

    /// The status stream of one VM, or `None` if the backend does not know it.
    fn status(&self, vm: &VmKey) -> Option<watch::Receiver<BackendStatus>>;

    /// Why the VM is in its current phase, if the backend says (for `/v1/vms`): the
    /// current status's message, without subscribing to it for good.
    fn status_message(&self, vm: &VmKey) -> Option<String> {
        self.status(vm).and_then(|status| status.borrow().message.clone())
    }

    /// Starts the VM. Returns once the request is accepted (the status stream tells
    /// when it runs). Starting a VM that is already starting or running is a no-op.
    async fn start(&self, vm: &VmKey) -> Result<(), BackendError>;

    /// Whether the VM's last `start` continued it from a hibernated state (rather than
    /// booting it): read once that call returned.
    fn restored(&self, vm: &VmKey) -> bool {
        let _ = vm;
        false
    }

    /// Stops the VM and returns once it is stopped.
    async fn stop(&self, vm: &VmKey) -> Result<(), BackendError>;

    /// Suspends the VM in memory and returns once it is paused.
    async fn pause(&self, vm: &VmKey) -> Result<(), BackendError> {
        let _ = vm;
        Err(BackendError::Unsupported("pause"))
    }

    /// Saves the VM's memory and device state to disk and ends it; the next `start`
    /// continues the guest where it was (or boots it, if the state cannot be used).
    /// Returns once the state is saved and the VM no longer runs.
    async fn hibernate(&self, vm: &VmKey) -> Result<(), BackendError> {
        let _ = vm;
        Err(BackendError::Unsupported("hibernate"))
    }

    /// Resumes a paused VM. Returns once the request is accepted.
    async fn resume(&self, vm: &VmKey) -> Result<(), BackendError> {
        let _ = vm;
        Err(BackendError::Unsupported("resume"))
    }

    /// Reviews the caller of an admin verb: is `token` valid, and may its user do
    /// `verb` to `vm`? Backends with an authority of their own (Kubernetes: TokenReview,
    /// then SubjectAccessReview) answer; the default has none.
    async fn review_access(&self, token: &str, vm: &VmKey, verb: AdminVerb) -> Result<Access, BackendError> {
        let _ = (token, vm, verb);
        Err(BackendError::Unsupported("access review"))
    }

    /// Tells the VM's operators about `event` where they look (Kubernetes: an Event on
    /// the target object). Never blocks and never fails the caller: a backend drops what
    /// it cannot send. The default tells nobody.
    fn record_event(&self, vm: &VmKey, event: VmEvent) {
        let _ = (vm, event);
    }

    /// Whether the backend can currently act (for `/readyz`).
    fn is_connected(&self) -> bool {
        true
    }

    /// Records that this replica saw traffic for the VM at `at`, where other replicas
    /// can see it. The caller rate-limits this (at most once per `idle_timeout / 10`).
    /// A single-process backend need not do anything.
    async fn record_activity(&self, vm: &VmKey, at: SystemTime) -> Result<(), BackendError> {
        let _ = (vm, at);
        Ok(())
    }

    /// Keeps the VM's idle history (the text of an `idle_policy::History`) where every
    /// replica and the next activator find it — never with a call of its own: the
    /// Kubernetes backend writes it with its next idle scale-down of the target (in the
    /// same compare-and-stop patch), the local backend to a file in its configured run
    /// directory. The default keeps nothing. Never blocks for long, never fails the caller.
    fn record_idle_history(&self, vm: &VmKey, history: &str) {
        let _ = (vm, history);
    }

    /// The latest activity any replica recorded for the VM, if the backend shares one.
    fn shared_activity(&self, vm: &VmKey) -> Option<SystemTime> {
        let _ = vm;
        None
    }

    /// Stops the VM unless another replica recorded activity since it was last read:
    /// the compare-and-stop that lets replicas agree without a leader. `local_activity`
    /// is this replica's last activity, recorded first if nothing is recorded yet.
    /// Returns once the VM is stopped, or at once with `PeerActive`. A single-process
    /// backend simply stops.
    async fn stop_if_idle(&self, vm: &VmKey, local_activity: SystemTime) -> Result<StopOutcome, BackendError> {
        let _ = local_activity;
        self.stop(vm).await.map(|()| StopOutcome::Stopped)
    }

    /// Releases what the backend holds (e.g. stops local VMs) before the process exits.
    async fn shutdown(&self) {}
}
