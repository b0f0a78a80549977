//! Workloads with a `/scale` subresource (Deployments, StatefulSets, configured kinds
//! such as KubeVirt's VirtualMachinePool) and their pods: what is kept of each object,
//! which pods belong to a workload (its label selector), and the status a workload has —
//! its endpoints are the addresses of its ready pods, on the pod network or on the
//! Multus network the policy names (from the pod's `k8s.v1.cni.cncf.io/network-status`).
//! Which pods are a workload's is `selector.rs`.
//!
//! Pure functions of the objects: no API calls here (`scale.rs` writes).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::core::SelectorExt;
use kube::runtime::reflector::Store;
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::json;

use super::selector::selector_of;
use crate::backend::{BackendPhase, BackendStatus};
use crate::config::ScaleKind;
use crate::vm::SCALED_DOWN_FROM_ANNOTATION;

/// Multus writes every attachment of a pod here, as a JSON list.
pub(super) const NETWORK_STATUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";

/// One managed kind and the store of its opted-in objects.
pub(super) struct WorkloadKind {
    /// Group, version, kind and plural, for requests.
    pub(super) resource: ApiResource,
    /// The opted-in objects, slimmed by [`keep_workload_fields`].
    pub(super) store: Store<DynamicObject>,
}

/// The `ApiResource` of a configured kind.
pub(super) fn api_resource(kind: &ScaleKind) -> ApiResource {
    let gvk = GroupVersionKind::gvk(&kind.group, &kind.version, &kind.kind);
    ApiResource::from_gvk_with_plural(&gvk, &kind.plural)
}

/// Drops everything of a workload but what is read: its replica count and selector
/// (a pod template alone can be kilobytes; thousands of workloads are watched).
pub(super) fn keep_workload_fields(object: &mut DynamicObject) {
    let data = &object.data;
    object.data = json!({
        "spec": {"replicas": data["spec"]["replicas"], "selector": data["spec"]["selector"]},
        "status": {"selector": data["status"]["selector"], "labelSelector": data["status"]["labelSelector"]},
    });
}

/// Drops everything of a pod but what is read: its labels (selection), the Multus
/// network status, whether it is being deleted, its phase, address and Ready condition.
pub(super) fn keep_pod_fields(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.owner_references = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|key, _| key == NETWORK_STATUS_ANNOTATION);
    }
    pod.spec = None;
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            conditions: status
                .conditions
                .map(|conditions| conditions.into_iter().filter(|c| c.type_ == "Ready").collect()),
            ..PodStatus::default()
        });
    }
}

/// The workload's `spec.replicas` (absent = 1, the API servers' default).
pub(super) fn replicas(workload: &DynamicObject) -> u64 {
    workload.data["spec"]["replicas"].as_u64().unwrap_or(1)
}

/// The replica count remembered at the last scale-down, if any.
pub(super) fn remembered_replicas(workload: &DynamicObject) -> Option<u32> {
    workload
        .annotations()
        .get(SCALED_DOWN_FROM_ANNOTATION)?
        .parse()
        .ok()
        .filter(|n| *n > 0)
}

/// What the backend reports for a workload, from the workload and the pods of its
/// namespace: Stopped at zero replicas with no pod left, Stopping while pods remain;
/// otherwise Running with the ready pods' addresses once there is one, else Starting
/// with the reason.
pub(super) fn derive_workload_status<'a>(
    workload: &DynamicObject,
    pods: impl IntoIterator<Item = &'a Arc<Pod>>,
    port: u16,
    network: Option<&str>,
) -> BackendStatus {
    let status = |phase, endpoints, message: Option<String>| BackendStatus {
        phase,
        endpoints,
        message,
    };
    let selector = match selector_of(workload) {
        Ok(selector) => selector,
        Err(problem) => return status(BackendPhase::Stopped, Vec::new(), Some(problem)),
    };
    let empty = BTreeMap::new();
    let selected: Vec<&Arc<Pod>> = pods
        .into_iter()
        .filter(|pod| selector.matches(pod.metadata.labels.as_ref().unwrap_or(&empty)))
        .collect();
    let desired = replicas(workload);
    if desired == 0 {
        return match selected.len() {
            0 => status(BackendPhase::Stopped, Vec::new(), None),
            left => status(
                BackendPhase::Stopping,
                Vec::new(),
                Some(format!("scaled to 0; {left} pod(s) still terminating")),
            ),
        };
    }
    let mut endpoints = Vec::new();
    let mut problems = Vec::new();
    let mut ready = 0;
    for pod in selected.iter().filter(|pod| is_ready(pod)) {
        ready += 1;
        match pod_address(pod, network) {
            Ok(ip) => endpoints.push(SocketAddr::new(ip, port)),
            Err(problem) => problems.push(format!("pod {}: {problem}", pod.name_any())),
        }
    }
    endpoints.sort();
    if !endpoints.is_empty() {
        return status(BackendPhase::Running, endpoints, None);
    }
    problems.sort();
    let message = match problems.first() {
        Some(problem) => problem.clone(),
        None => format!("{ready} of {desired} pod(s) ready"),
    };
    status(BackendPhase::Starting, Vec::new(), Some(message))
}

/// Ready = not being deleted, Running, and its Ready condition true.
fn is_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    pod.metadata.deletion_timestamp.is_none()
        && status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// One entry of the Multus network-status annotation.
#[derive(Deserialize)]
struct AttachedNetwork {
    name: String,
    #[serde(default)]
    ips: Vec<String>,
}

/// The pod's address: its pod IP, or its first address on `network` (`namespace/name`).
/// Never another network's address.
fn pod_address(pod: &Pod, network: Option<&str>) -> Result<IpAddr, String> {
    let Some(network) = network else {
        return pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .ok_or_else(|| "no pod IP yet".to_string())?
            .parse()
            .map_err(|e| format!("bad pod IP: {e}"));
    };
    let text = pod
        .annotations()
        .get(NETWORK_STATUS_ANNOTATION)
        .ok_or_else(|| format!("no address on network {network} yet (no {NETWORK_STATUS_ANNOTATION})"))?;
    let attached: Vec<AttachedNetwork> =
        serde_json::from_str(text).map_err(|e| format!("unreadable {NETWORK_STATUS_ANNOTATION}: {e}"))?;
    let namespace = pod.namespace().unwrap_or_default();
    let entry = attached
        .iter()
        .find(|a| a.name == network || (!a.name.contains('/') && format!("{namespace}/{}", a.name) == network))
        .ok_or_else(|| format!("not attached to network {network}"))?;
    entry
        .ips
        .iter()
        .find_map(|ip| ip.parse().ok())
        .ok_or_else(|| format!("no address on network {network} yet"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodCondition;

    fn workload(replicas: u64, selector: serde_json::Value) -> DynamicObject {
        let resource = api_resource(&ScaleKind::deployment());
        let mut object = DynamicObject::new("web", &resource).within("apps");
        object.data = json!({"spec": {"replicas": replicas, "selector": selector}});
        object
    }

    fn pod(name: &str, app: &str, ip: &str, ready: bool, networks: Option<&str>) -> Arc<Pod> {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("apps".into());
        pod.metadata.labels = Some([("app".to_string(), app.to_string())].into());
        if let Some(networks) = networks {
            pod.metadata.annotations = Some([(NETWORK_STATUS_ANNOTATION.to_string(), networks.to_string())].into());
        }
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        Arc::new(pod)
    }

    #[test]
    fn status_table() {
        let by_app = json!({"matchLabels": {"app": "web"}});
        let vlan = r#"[{"name":"kindnet","ips":["10.0.0.1"],"default":true},{"name":"apps/vlan-10","interface":"net1","ips":["192.168.10.4"]}]"#;
        let a = pod("web-a", "web", "10.0.0.1", true, Some(vlan));
        let b = pod("web-b", "web", "10.0.0.2", true, None);
        let unready = pod("web-c", "web", "10.0.0.3", false, None);
        let other = pod("db-a", "db", "10.0.0.9", true, None);
        let ep = |s: &str| -> SocketAddr { s.parse().unwrap() };
        // (case, replicas, pods, network, phase, endpoints, message contains)
        type Case<'a> = (
            &'a str,
            u64,
            Vec<&'a Arc<Pod>>,
            Option<&'a str>,
            BackendPhase,
            Vec<SocketAddr>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "at zero, no pods",
                0,
                vec![&other],
                None,
                BackendPhase::Stopped,
                vec![],
                "",
            ),
            (
                "at zero, pods left",
                0,
                vec![&a],
                None,
                BackendPhase::Stopping,
                vec![],
                "terminating",
            ),
            (
                "scaled up, none ready",
                2,
                vec![&unready, &other],
                None,
                BackendPhase::Starting,
                vec![],
                "0 of 2",
            ),
            (
                "ready pods are the endpoints, sorted",
                3,
                vec![&b, &unready, &a, &other],
                None,
                BackendPhase::Running,
                vec![ep("10.0.0.1:80"), ep("10.0.0.2:80")],
                "",
            ),
            (
                "a network picks its address",
                2,
                vec![&a, &b],
                Some("apps/vlan-10"),
                BackendPhase::Running,
                vec![ep("192.168.10.4:80")],
                "",
            ),
            (
                "no pod on the network: not ready, never the pod IP",
                1,
                vec![&b],
                Some("apps/vlan-10"),
                BackendPhase::Starting,
                vec![],
                "no address on network apps/vlan-10",
            ),
            (
                "another network is not this one",
                1,
                vec![&a],
                Some("apps/vlan-20"),
                BackendPhase::Starting,
                vec![],
                "not attached to network apps/vlan-20",
            ),
        ];
        for (name, replicas, pods, network, phase, endpoints, message) in cases {
            let status = derive_workload_status(&workload(replicas, by_app.clone()), pods, 80, network);
            assert_eq!(status.phase, phase, "{name}");
            assert_eq!(status.endpoints, endpoints, "{name}");
            assert!(
                status.message.as_deref().unwrap_or_default().contains(message),
                "{name}: {:?}",
                status.message
            );
        }
    }

    #[test]
    fn only_what_is_read_is_kept() {
        let mut object = workload(2, json!({"matchLabels": {"app": "web"}}));
        object.data["spec"]["template"] = json!({"spec": {"containers": [{"name": "big"}]}});
        keep_workload_fields(&mut object);
        assert_eq!(object.data["spec"]["replicas"], 2);
        assert!(object.data["spec"]["template"].is_null());

        let mut pod = (*pod("web-a", "web", "10.0.0.1", true, Some("[]"))).clone();
        pod.metadata.annotations.as_mut().unwrap().insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{...}".into(),
        );
        pod.spec = Some(Default::default());
        keep_pod_fields(&mut pod);
        assert!(pod.spec.is_none());
        assert_eq!(pod.metadata.annotations.as_ref().unwrap().len(), 1);
        assert!(is_ready(&pod));
    }
}
