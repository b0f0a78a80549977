//! What a name stands for: a VirtualMachine or one opted-in workload — or, when several
//! opted-in objects of different kinds share a namespace and name, a conflict that is
//! refused (listed in `/v1/vms`, answered 409), never a silent pick. The catalog entry
//! and the status of each name are built from here.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::DynamicObject;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;

use super::status::derive_status;
use super::workloads::derive_workload_status;
use super::{KubevirtBackend, VirtualMachine};
use crate::backend::{BackendError, BackendPhase, BackendStatus};
use crate::vm::{Policy, ScaleDown, VmKey, VIRTUAL_MACHINE};

/// The object a name stands for.
pub(super) enum Target {
    /// A KubeVirt VirtualMachine.
    Vm(Arc<VirtualMachine>),
    /// A workload of the backend's `kind`-th workload kind.
    Workload {
        /// Index into the backend's workload kinds.
        kind: usize,
        /// The (slimmed) object.
        object: Arc<DynamicObject>,
    },
}

impl Target {
    /// The target's annotations (only the activator's are kept).
    pub(super) fn annotations(&self) -> &BTreeMap<String, String> {
        match self {
            Target::Vm(vm) => vm.annotations(),
            Target::Workload { object, .. } => object.annotations(),
        }
    }
}

/// Every opted-in object named `key`, VMs first then workloads in config order.
pub(super) fn targets_named(backend: &KubevirtBackend, key: &VmKey) -> Vec<Target> {
    let mut found = Vec::new();
    if let Some(vm) = backend.vm(key) {
        found.push(Target::Vm(vm));
    }
    for (kind, workloads) in backend.workloads.iter().enumerate() {
        let reference = ObjectRef::new_with(&key.name, workloads.resource.clone()).within(&key.namespace);
        if let Some(object) = workloads.store.get(&reference) {
            found.push(Target::Workload { kind, object });
        }
    }
    found
}

impl KubevirtBackend {
    /// The one object `key` stands for: `NotFound` for none, a failure for a conflict.
    pub(super) fn target(&self, key: &VmKey) -> Result<Target, BackendError> {
        let mut found = targets_named(self, key);
        match found.len() {
            0 => Err(BackendError::NotFound(key.clone())),
            1 => Ok(found.remove(0)),
            _ => Err(BackendError::Failed {
                op: "resolve",
                message: self.conflict(key, &found),
            }),
        }
    }

    /// The kind of a target, as users name it (`VirtualMachine`, `Deployment`, ...).
    pub(super) fn kind_of(&self, target: &Target) -> &str {
        match target {
            Target::Vm(_) => VIRTUAL_MACHINE,
            Target::Workload { kind, .. } => &self.workloads[*kind].resource.kind,
        }
    }

    fn conflict(&self, key: &VmKey, found: &[Target]) -> String {
        let kinds: Vec<&str> = found.iter().map(|t| self.kind_of(t)).collect();
        format!(
            "{} named {} in namespace {} are all opted in; remove the label {} from all but one",
            kinds.join(" and "),
            key.name,
            key.namespace,
            crate::vm::OPT_IN_LABEL
        )
    }

    /// The catalog entry for `key`: its policy, a refusing policy for a conflict, or
    /// `None` when nothing opted in has that name.
    pub(super) fn policy_for(&self, key: &VmKey) -> Option<Policy> {
        let found = targets_named(self, key);
        let first = found.first()?;
        let mut policy = self.policy_of(first);
        if found.len() > 1 {
            policy.kind = found.iter().map(|t| self.kind_of(t)).collect::<Vec<_>>().join(",");
            policy.refused = Some(self.conflict(key, &found));
        }
        Some(policy)
    }

    /// A target's policy from its annotations, with its kind; a workload asked to pause
    /// gets a warning and is scaled to zero instead, a VM asked to hibernate a warning and
    /// the nearest plan KubeVirt has.
    pub(super) fn policy_of(&self, target: &Target) -> Policy {
        let annotations = target.annotations();
        let mut policy = Policy::from_annotations(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        policy.kind = self.kind_of(target).to_string();
        if matches!(target, Target::Workload { .. }) && policy.scale_down != ScaleDown::Stop {
            policy.warnings.push(format!(
                "vm-activator.io/scale-down={}: a {} cannot pause; it is scaled to zero instead",
                policy.scale_down, policy.kind
            ));
            policy.scale_down = ScaleDown::Stop;
        } else if policy.scale_down.hibernates() {
            // KubeVirt has no memory snapshot to restore from (kubevirt/kubevirt#18054).
            let instead = match policy.scale_down {
                ScaleDown::PauseThenHibernate => ScaleDown::PauseThenStop,
                _ => ScaleDown::Stop,
            };
            policy.warnings.push(format!(
                "vm-activator.io/scale-down={}: KubeVirt cannot hibernate a VM; {instead} instead",
                policy.scale_down
            ));
            policy.scale_down = instead;
        }
        policy
    }

    /// One name's status as the stores show it now.
    pub(super) fn current_status(&self, key: &VmKey) -> BackendStatus {
        let vmi = || self.vmis.get(&ObjectRef::new(&key.name).within(&key.namespace));
        let found = targets_named(self, key);
        match found.as_slice() {
            [] => {
                let mut status = derive_status(None, vmi().as_deref(), 8080, None);
                if status.phase == BackendPhase::Stopped {
                    status.message = Some("nothing opted in has this name any more".into());
                }
                status
            }
            [target @ Target::Vm(vm)] => {
                let policy = self.policy_of(target);
                let network = policy.qualified_network(&key.namespace);
                derive_status(Some(vm), vmi().as_deref(), policy.port, network.as_deref())
            }
            [target @ Target::Workload { object, .. }] => {
                let policy = self.policy_of(target);
                let network = policy.qualified_network(&key.namespace);
                let pods = self.pods.state();
                let in_namespace = pods
                    .iter()
                    .filter(|pod| pod.metadata.namespace.as_deref() == Some(&key.namespace));
                derive_workload_status(object, in_namespace, policy.port, network.as_deref())
            }
            conflicting => BackendStatus {
                message: Some(self.conflict(key, conflicting)),
                ..BackendStatus::stopped()
            },
        }
    }
}
