//! The two KubeVirt kinds the backend reads (only the fields it uses), and the
//! Kubernetes API permissions it needs.
//!
//! Workloads (Deployments, StatefulSets, configured kinds) are read as dynamic objects
//! and pods as k8s-openapi's `Pod`, both slimmed to the fields used (`workloads.rs`).

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// Every Kubernetes API permission the backend uses: `(API group, resource, verbs)`.
/// `deploy/base/rbac.yaml` grants exactly these (a test checks it, and the end-to-end
/// tests check that every request they observe is covered). VMs: `patch` sets the run
/// strategy and the activity record, `get` re-reads after a failed compare-and-stop.
/// Workloads: `patch` writes the activity record and the remembered replica count,
/// `deployments/scale` and `statefulsets/scale` `get`/`patch` scale them; pods are
/// only listed and watched (their ready addresses are the endpoints). Callers of the admin verbs
/// are reviewed by the API server (`create` on `tokenreviews` and
/// `subjectaccessreviews`, as `system:auth-delegator` grants); Kubernetes Events on the
/// targets need `create` and `patch` on `events.k8s.io` `events`. Pausing needs
/// the extra [`PAUSE_API_ACCESS`] (the `deploy/components/pause` component); a kind from
/// `kubevirt.scale_kinds` needs the same rules for its resource (e.g.
/// `deploy/components/virtualmachinepools`).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("kubevirt.io", "virtualmachines", &["get", "list", "watch", "patch"]),
    ("kubevirt.io", "virtualmachineinstances", &["get", "list", "watch"]),
    ("apps", "deployments", &["get", "list", "watch", "patch"]),
    ("apps", "deployments/scale", &["get", "patch"]),
    ("apps", "statefulsets", &["get", "list", "watch", "patch"]),
    ("apps", "statefulsets/scale", &["get", "patch"]),
    ("", "pods", &["list", "watch"]),
    ("authentication.k8s.io", "tokenreviews", &["create"]),
    ("authorization.k8s.io", "subjectaccessreviews", &["create"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// What a kind from `kubevirt.scale_kinds` needs, for its `(group, plural)`: the rules
/// `deploy/components/virtualmachinepools` grants for KubeVirt's pools.
pub fn scale_kind_access<'a>(group: &'a str, plural: &str) -> [(&'a str, String, &'static [&'static str]); 2] {
    [
        (group, plural.to_string(), &["get", "list", "watch", "patch"]),
        (group, format!("{plural}/scale"), &["get", "patch"]),
    ]
}

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
    /// The VMI template: only its networks are read (to find a Multus interface).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<VmTemplate>,
}

/// `VirtualMachine.spec.template`, the fields used.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct VmTemplate {
    /// The template's spec.
    #[serde(default)]
    pub spec: VmTemplateSpec,
}

/// `VirtualMachine.spec.template.spec`, the fields used.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct VmTemplateSpec {
    /// The VM's networks: each names an interface and where it is attached.
    #[serde(default)]
    pub networks: Vec<VmNetwork>,
}

/// One network of a VM: the pod network or a Multus network.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct VmNetwork {
    /// The interface name (also the VMI's `status.interfaces[].name`).
    pub name: String,
    /// Set when the network is a Multus NetworkAttachmentDefinition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multus: Option<MultusNetwork>,
}

/// A VM network's Multus attachment.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MultusNetwork {
    /// The NetworkAttachmentDefinition: `name` (in the VM's namespace) or `namespace/name`.
    pub network_name: String,
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
    /// The interface's name, as in the VM's `spec.template.spec.networks[].name`.
    #[serde(default)]
    pub name: Option<String>,
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
