//! The simulated workload controllers and kubelet: a Deployment, StatefulSet or
//! VirtualMachinePool with `spec.replicas = N` keeps N pods (labels and annotations from
//! its pod template, an owner reference to it), each Pending until "scheduled", then
//! Running and Ready with an address on 127.0.0.0/8 where the guest application listens
//! a little later. Pods beyond the replica count, or of a deleted workload, go away with
//! their guests; a pod deleted by hand is replaced. A pod template naming a Multus network
//! (`k8s.v1.cni.cncf.io/networks`) gets a second address on it in the pod's
//! `k8s.v1.cni.cncf.io/network-status` annotation — and its guest listens there only.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::guest::reserve_socket;
use crate::{Guest, Inner, Res};

/// The Multus annotations.
pub(crate) const NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
pub(crate) const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";

/// The pods' key in the guest maps (they share them with VMs).
pub(crate) fn pod_key(ns: &str, pod: &str) -> (String, String) {
    (ns.to_string(), format!("pod/{pod}"))
}

/// The pods `owner` (a workload of kind `res`) keeps in `ns`, not being deleted.
pub(crate) fn owned_pods(inner: &Inner, res: Res, ns: &str, owner: &str) -> Vec<Value> {
    inner
        .list(Res::Pod, ns)
        .into_iter()
        .filter(|pod| {
            let reference = &pod["metadata"]["ownerReferences"][0];
            reference["kind"] == res.kind() && reference["name"] == owner
        })
        .collect()
}

/// Brings the workload's pods to its replica count.
pub(crate) fn reconcile_workload(inner: &Arc<Inner>, res: Res, ns: &str, name: &str) {
    let workload = inner.get(res, ns, name);
    let desired = workload
        .as_ref()
        .map(|w| w["spec"]["replicas"].as_u64().unwrap_or(1) as usize)
        .unwrap_or(0);
    let mut pods = owned_pods(inner, res, ns, name);
    pods.sort_by_key(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_string());
    while pods.len() > desired {
        let pod = pods.pop().expect("more than desired");
        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        delete_pod(inner, ns, &pod_name);
    }
    let Some(workload) = workload else {
        return;
    };
    let mut taken: Vec<String> = pods
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap_or_default().to_string())
        .collect();
    for _ in pods.len()..desired {
        let pod_name = (0..)
            .map(|i| format!("{name}-{i}"))
            .find(|candidate| !taken.contains(candidate))
            .expect("a free ordinal");
        taken.push(pod_name.clone());
        create_pod(inner, res, &workload, ns, &pod_name);
    }
    let ready = owned_pods(inner, res, ns, name)
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .count();
    let mut workload = workload;
    if workload["status"]["replicas"] != json!(desired) || workload["status"]["readyReplicas"] != json!(ready) {
        workload["status"]["replicas"] = json!(desired);
        workload["status"]["readyReplicas"] = json!(ready);
        inner.write(res, ns, name, Some(workload));
    }
}

fn create_pod(inner: &Arc<Inner>, res: Res, workload: &Value, ns: &str, pod_name: &str) {
    // A pool's pods are its VMs' virt-launcher pods: labelled as its VM template's VMIs.
    let template = match res {
        Res::VmPool => &workload["spec"]["virtualMachineTemplate"]["spec"]["template"]["metadata"],
        _ => &workload["spec"]["template"]["metadata"],
    };
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name, "namespace": ns,
            "labels": template["labels"], "annotations": template["annotations"],
            "ownerReferences": [{
                "apiVersion": res.api_version(), "kind": res.kind(),
                "name": workload["metadata"]["name"], "uid": workload["metadata"]["uid"], "controller": true,
            }],
        },
        "spec": {"containers": [{"name": "app", "image": "guest"}]},
        "status": {"phase": "Pending"},
    });
    let created = inner.write(Res::Pod, ns, pod_name, Some(pod)).expect("created");
    let uid = created["metadata"]["uid"].clone();
    let port = workload["metadata"]["annotations"]["vm-activator.io/port"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080u16);
    let network = template["annotations"][NETWORKS].as_str().map(str::to_string);
    tokio::spawn(boot_pod(
        Arc::downgrade(inner),
        ns.to_string(),
        pod_name.to_string(),
        uid,
        port,
        network,
    ));
}

/// Deletes a pod at once (as its kubelet would, after the grace period) and ends its guest.
pub(crate) fn delete_pod(inner: &Inner, ns: &str, pod_name: &str) {
    if let Some(guest) = inner.guests.lock().unwrap().remove(&pod_key(ns, pod_name)) {
        guest.task.abort();
    }
    inner.write(Res::Pod, ns, pod_name, None);
}

/// The kubelet's part: scheduled, then Running and Ready with an address (and one on
/// the Multus network, if asked for), then the guest listens.
async fn boot_pod(
    inner: std::sync::Weak<Inner>,
    ns: String,
    pod_name: String,
    uid: Value,
    port: u16,
    network: Option<String>,
) {
    let options = match inner.upgrade() {
        Some(inner) => inner.options.lock().unwrap().clone(),
        None => return,
    };
    tokio::time::sleep(options.schedule_delay + options.running_delay).await;
    let Some(primary) = reserve_socket(port) else {
        eprintln!("fake kubelet: no free address for pod {ns}/{pod_name}");
        return;
    };
    let secondary = match &network {
        Some(_) => match reserve_socket(port) {
            Some(socket) => Some(socket),
            None => return,
        },
        None => None,
    };
    let primary_ip = primary.local_addr().expect("bound").ip().to_string();
    {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        // Not this pod any more (deleted, or deleted and replaced under the same name).
        let Some(mut pod) = inner
            .get(Res::Pod, &ns, &pod_name)
            .filter(|p| p["metadata"]["uid"] == uid)
        else {
            return;
        };
        pod["spec"]["nodeName"] = json!("node-1");
        pod["status"] = json!({
            "phase": "Running",
            "podIP": primary_ip, "podIPs": [{"ip": primary_ip}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
        });
        if let (Some(network), Some(secondary)) = (&network, &secondary) {
            let ip = secondary.local_addr().expect("bound").ip().to_string();
            let name = if network.contains('/') {
                network.clone()
            } else {
                format!("{ns}/{network}")
            };
            let status = json!([
                {"name": "kindnet", "interface": "eth0", "ips": [primary_ip], "default": true},
                {"name": name, "interface": "net1", "ips": [ip]},
            ]);
            pod["metadata"]["annotations"][NETWORK_STATUS] = json!(status.to_string());
        }
        inner.write(Res::Pod, &ns, &pod_name, Some(pod));
        let owner = inner
            .get(Res::Pod, &ns, &pod_name)
            .and_then(|p| p["metadata"]["ownerReferences"][0]["kind"].as_str().map(str::to_string));
        if let Some(res) = owner.and_then(|kind| Res::from_kind(&kind)) {
            let workload = inner
                .get(Res::Pod, &ns, &pod_name)
                .and_then(|p| p["metadata"]["ownerReferences"][0]["name"].as_str().map(str::to_string));
            if let Some(workload) = workload {
                reconcile_workload(&inner, res, &ns, &workload);
            }
        }
    }
    tokio::time::sleep(options.guest_delay).await;
    let Some(strong) = inner.upgrade() else {
        return;
    };
    if strong
        .get(Res::Pod, &ns, &pod_name)
        .is_none_or(|p| p["metadata"]["uid"] != uid)
    {
        return;
    }
    let log = strong.guest_log(&ns, &format!("pod/{pod_name}"));
    // The guest listens on the network the pod was asked onto, else its pod address.
    let socket = secondary.unwrap_or(primary);
    let mut held = strong.guests_held.subscribe();
    let style = options.guest;
    let task = tokio::spawn(async move {
        let _ = held.wait_for(|held| !*held).await;
        crate::guest::run(socket, log, style).await;
    });
    strong
        .guests
        .lock()
        .unwrap()
        .insert(pod_key(&ns, &pod_name), Guest { task, proxy: None });
}
