//! The two KubeVirt kinds the backend reads (only the fields it uses), and the
//! Kubernetes API permissions it needs.

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// Every Kubernetes API permission the backend uses: `(API group, resource, verbs)`.
/// `deploy/base/rbac.yaml` grants exactly these (a test checks it, and the end-to-end
/// tests check that every request they observe is covered). `get` is for re-reading a
/// VM after a failed compare-and-stop. Pausing needs the extra
/// [`PAUSE_API_ACCESS`] (the `deploy/components/pause` component).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("kubevirt.io", "virtualmachines", &["get", "list", "watch", "patch"]),
    ("kubevirt.io", "virtualmachineinstances", &["get", "list", "watch"]),
];

/// Extra permissions for `kubevirt.pause: true`.
pub const PAUSE_API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("subresources.kubevirt.io", "virtualmachineinstances/pause", &["update"]),
    (
        "subresources.kubevirt.io",
        "virtualmachineinstances/unpause",
        &["update"],
    ),
];

/// The parts of a KubeVirt `VirtualMachine` spec the activator reads and patches.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachine",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// `Always`, `Halted`, `Manual`, `RerunOnFailure`, `Once`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<String>,
    /// Deprecated predecessor of `runStrategy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
}

/// The parts of a KubeVirt `VirtualMachineInstance` the activator reads.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachineInstance",
    namespaced,
    status = "VmiStatus",
    schema = "disabled"
)]
pub struct VmiSpec {}

/// `VirtualMachineInstance.status`, the fields used.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    /// `Pending`, `Scheduling`, `Scheduled`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Network interfaces; the first one's address is the guest's.
    #[serde(default)]
    pub interfaces: Vec<VmiInterface>,
    /// Conditions (`Ready`, `Paused`, ...).
    #[serde(default)]
    pub conditions: Vec<VmiCondition>,
}

/// One VMI network interface.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiInterface {
    /// The interface's primary IP address.
    #[serde(default)]
    pub ip_address: Option<String>,
}

/// One VMI condition.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct VmiCondition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
}
