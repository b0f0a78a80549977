//! The backends' sections: KubeVirt, local QEMU, and the VMs of the local backend.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::human_duration;
use crate::idle_policy::IdlePolicy;
use crate::vm::{Policy, Readiness, ScaleDown, VmKey};

/// The Kubernetes backend: KubeVirt VirtualMachines and workloads with a `/scale`
/// subresource.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubevirtConfig {
    /// Kubeconfig file; default: `KUBECONFIG`, `~/.kube/config`, or in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Only targets in these namespaces; empty = every namespace (needs a ClusterRole).
    pub namespaces: Vec<String>,
    /// Scale down by pausing through `subresources.kubevirt.io` (needs the
    /// `virtualmachineinstances/pause` and `/unpause` RBAC verbs). Default false: a VM
    /// whose policy says pause is stopped instead.
    pub pause: bool,
    /// Also manage opted-in `apps/v1` Deployments and StatefulSets (and watch pods, whose
    /// ready addresses are their endpoints). Default true.
    pub workloads: bool,
    /// More kinds with a `/scale` subresource to manage, e.g. KubeVirt's
    /// VirtualMachinePool (each needs its RBAC rule: see `deploy/components/`).
    pub scale_kinds: Vec<ScaleKind>,
    /// The API server ends each watch after this long (the watch then resumes from its
    /// last version, no re-list). Any connection to the API server silent for this + 4 s
    /// — a watch that delivers nothing, not even its end — is given up: the watch fails,
    /// `/readyz` fails and a re-list is tried, so a half-open path to the API server is
    /// noticed within this + 4 s (59 s by default). Default 55s; 5s to 290s.
    #[serde(with = "human_duration")]
    pub watch_timeout: Duration,
}

impl Default for KubevirtConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            namespaces: Vec::new(),
            pause: false,
            workloads: true,
            scale_kinds: Vec::new(),
            watch_timeout: Duration::from_secs(55),
        }
    }
}

/// A kind with a `/scale` subresource whose objects carry a pod `spec.selector` (a
/// label selector, or a selector string in `status.selector` / `status.labelSelector`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleKind {
    /// API group, e.g. `pool.kubevirt.io`.
    pub group: String,
    /// API version, e.g. `v1beta1`.
    pub version: String,
    /// Kind, e.g. `VirtualMachinePool`.
    pub kind: String,
    /// Resource name in URLs, e.g. `virtualmachinepools`.
    pub plural: String,
}

impl ScaleKind {
    /// `apps/v1` Deployment.
    pub fn deployment() -> ScaleKind {
        ScaleKind::new("apps", "v1", "Deployment", "deployments")
    }

    /// `apps/v1` StatefulSet.
    pub fn stateful_set() -> ScaleKind {
        ScaleKind::new("apps", "v1", "StatefulSet", "statefulsets")
    }

    /// A kind by its parts.
    pub fn new(group: &str, version: &str, kind: &str, plural: &str) -> ScaleKind {
        ScaleKind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
        }
    }
}

impl KubevirtConfig {
    /// Every workload kind managed besides VirtualMachines.
    pub fn workload_kinds(&self) -> Vec<ScaleKind> {
        let builtin = if self.workloads {
            vec![ScaleKind::deployment(), ScaleKind::stateful_set()]
        } else {
            Vec::new()
        };
        let mut kinds = builtin;
        for kind in &self.scale_kinds {
            if !kinds.contains(kind) {
                kinds.push(kind.clone());
            }
        }
        kinds
    }
}

/// Hardware acceleration for local QEMU guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the CPU has vmx/svm and /dev/kvm opens, otherwise TCG.
    #[default]
    Auto,
    /// Always KVM (fails to start without it).
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// The local QEMU backend.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The emulator binary.
    pub binary: PathBuf,
    /// Acceleration.
    pub accel: Accel,
    /// After QMP `system_powerdown`, wait this long before `quit`. Default 5s.
    #[serde(with = "human_duration")]
    pub stop_grace: Duration,
    /// Where QMP sockets, console logs and hibernated VMs' state files go. Default: a
    /// directory under the system temp dir.
    pub run_dir: Option<PathBuf>,
    /// The most disk all hibernated VMs' state files may take, in MiB. A hibernation that
    /// could pass it (counting the VM's whole RAM) stops the VM instead. Default 4096.
    pub hibernate_disk_budget_mib: u64,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            stop_grace: Duration::from_secs(5),
            run_dir: None,
            hibernate_disk_budget_mib: 4096,
        }
    }
}

/// One VM of the local QEMU backend: identity, policy overrides and machine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Namespace part of the ingress path.
    pub namespace: String,
    /// Name part of the ingress path.
    pub name: String,
    /// Guest HTTP port. Default 8080.
    pub port: Option<u16>,
    /// Guest path prefix. Default `/`.
    pub path: Option<String>,
    /// Idle time before scale-down. Default 10m.
    #[serde(default, with = "human_duration::option")]
    pub idle_timeout: Option<Duration>,
    /// `stop`, `pause`, `pause-then-stop`, `hibernate`, `pause-then-hibernate` or
    /// `hibernate-then-stop`. Default stop.
    pub scale_down: Option<ScaleDown>,
    /// Start call to Ready. Default 120s.
    #[serde(default, with = "human_duration::option")]
    pub start_timeout: Option<Duration>,
    /// Held requests while not Ready. Default 1000.
    pub max_buffered: Option<usize>,
    /// Held body bytes while not Ready. Default 64 MiB.
    pub max_buffered_bytes: Option<usize>,
    /// Requests in flight to each endpoint at once; 0 = unlimited. Default 0.
    pub concurrency: Option<usize>,
    /// `tcp`, `http` or `http:/path`. Default `http` (GET /).
    pub readiness: Option<Readiness>,
    /// Guest answer timeout per request (→ 504). Default 30s.
    #[serde(default, with = "human_duration::option")]
    pub request_timeout: Option<Duration>,
    /// OIDC subjects allowed to deliver to this VM (`*` suffix wildcard); empty = any
    /// subject the global list allows.
    #[serde(default)]
    pub allowed_subjects: Vec<String>,
    /// Windows in which the VM is kept running whatever its traffic, e.g.
    /// `Mon-Fri 08:00-18:00 Europe/Berlin` (several joined by `;`). Default none.
    pub keep_warm: Option<String>,
    /// `fixed` or `adaptive`. Default: `idle.policy`.
    pub idle_policy: Option<IdlePolicy>,
    /// The machine to boot.
    pub machine: MachineConfig,
}

impl VmConfig {
    /// The VM's key.
    pub fn key(&self) -> VmKey {
        VmKey::new(&self.namespace, &self.name)
    }

    /// The effective policy: overrides on top of [`Policy::default`].
    pub fn policy(&self) -> Policy {
        let d = Policy::default();
        Policy {
            port: self.port.unwrap_or(d.port),
            path: self.path.clone().unwrap_or(d.path),
            idle_timeout: self.idle_timeout.unwrap_or(d.idle_timeout),
            scale_down: self.scale_down.unwrap_or(d.scale_down),
            start_timeout: self.start_timeout.unwrap_or(d.start_timeout),
            max_buffered: self.max_buffered.unwrap_or(d.max_buffered),
            max_buffered_bytes: self.max_buffered_bytes.unwrap_or(d.max_buffered_bytes),
            concurrency: self.concurrency.unwrap_or(d.concurrency),
            readiness: self.readiness.clone().unwrap_or(d.readiness),
            request_timeout: self.request_timeout.unwrap_or(d.request_timeout),
            allowed_subjects: self.allowed_subjects.clone(),
            // Validated at load (`config::validate`): a bad schedule never gets here.
            keep_warm: self
                .keep_warm
                .as_deref()
                .and_then(|s| s.parse().ok())
                .map(std::sync::Arc::new),
            idle_policy: self.idle_policy,
            ..d
        }
    }
}

/// What QEMU boots for one VM.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Kernel image (relative paths are relative to the config file's directory).
    pub kernel: PathBuf,
    /// Initramfs (relative paths are relative to the config file's directory).
    pub initrd: PathBuf,
    /// Kernel command line.
    #[serde(default = "default_append")]
    pub append: String,
    /// Guest memory in MiB. Default 256.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Virtual CPUs. Default 1.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
}

fn default_append() -> String {
    "console=ttyS0 quiet panic=-1".to_string()
}
fn default_memory() -> u32 {
    256
}
fn default_cpus() -> u32 {
    1
}
