//! The test's scheduler, kubelet and Multus against the real API server (which has none):
//! every new pod in the namespace is bound to `node-1`, then after the boot timings marked
//! Running and Ready with an address on 127.0.0.0/8 (and, if its template asks for a
//! Multus network with `k8s.v1.cni.cncf.io/networks`, a second address in its
//! `k8s.v1.cni.cncf.io/network-status` annotation, where alone the guest then listens);
//! fake-kube's guest application serves there a little later. A pod deleted loses its
//! guest at once; one left terminating is deleted for good (no kubelet would confirm it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fake_kube::guest::{self, GuestLog};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;
use tokio::task::JoinHandle;

use super::{post, Timings};

/// The node every pod is bound to.
const NODE: &str = "node-1";
/// Multus: the networks a pod asks for, and what it got.
const NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
const NETWORK_STATUS: &str = "k8s.v1.cni.cncf.io/network-status";

/// The node, created once per cluster (without it the pod garbage collector deletes
/// pods bound to it).
pub(super) async fn ensure_node(client: &kube::Client) {
    post(
        client,
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
    )
    .await;
}

/// Plays scheduler and kubelet in `namespace` until aborted. Guest logs are keyed by
/// pod name.
pub(super) async fn kubelet(
    client: kube::Client,
    namespace: String,
    logs: Arc<Mutex<HashMap<String, GuestLog>>>,
    timings: Timings,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut running: HashMap<String, JoinHandle<()>> = HashMap::new();
    // With a backoff: a watch that fails at once (the namespace deleted as the test
    // ends) would otherwise be retried in a loop that never yields, and the test's
    // runtime could never shut down (a soak run hung there, 10 min at full CPU).
    let mut events = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let (pod, deleted) = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => (pod, false),
            Ok(watcher::Event::Delete(pod)) => (pod, true),
            _ => continue,
        };
        let uid = pod.uid().unwrap_or_default();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        if deleted || terminating {
            if let Some(task) = running.remove(&uid) {
                task.abort();
            }
            if terminating && !deleted {
                let _ = pods
                    .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                    .await;
            }
            continue;
        }
        let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
        if !bound && !running.contains_key(&uid) {
            let log = logs.lock().unwrap().entry(pod.name_any()).or_default().clone();
            running.insert(uid, tokio::spawn(run(pods.clone(), pod, log, timings)));
        }
    }
}

/// One pod's life: bound, Running and Ready with its address(es), then its guest serves.
/// Aborting the task ends the guest.
async fn run(pods: Api<Pod>, pod: Pod, log: GuestLog, timings: Timings) {
    let name = pod.name_any();
    let namespace = pod.namespace().unwrap_or_default();
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
    });
    let path = format!("/api/v1/namespaces/{namespace}/pods/{name}/binding");
    let request = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&binding).unwrap())
        .unwrap();
    if pods.clone().into_client().request_text(request).await.is_err() {
        return;
    }
    tokio::time::sleep(timings.schedule + timings.running).await;
    let primary = guest::reserve_socket(8080).expect("a pod address");
    let primary_ip = primary.local_addr().expect("bound").ip().to_string();
    let network = pod.annotations().get(NETWORKS).cloned();
    let secondary = match &network {
        Some(network) => {
            let socket = guest::reserve_socket(8080).expect("a network address");
            let ip = socket.local_addr().expect("bound").ip().to_string();
            let name = match network.contains('/') {
                true => network.clone(),
                false => format!("{namespace}/{network}"),
            };
            let status = json!([
                {"name": "kindnet", "interface": "eth0", "ips": [primary_ip], "default": true},
                {"name": name, "interface": "net1", "ips": [ip]},
            ]);
            let patch = json!({"metadata": {"annotations": {NETWORK_STATUS: status.to_string()}}});
            if pods
                .patch(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_err()
            {
                return;
            }
            Some(socket)
        }
        None => None,
    };
    let status = json!({"status": {
        "phase": "Running",
        "podIP": primary_ip, "podIPs": [{"ip": primary_ip}],
        "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
    }});
    if pods
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&status))
        .await
        .is_err()
    {
        return;
    }
    tokio::time::sleep(timings.guest).await;
    let socket = secondary.unwrap_or(primary);
    guest::run(socket, log, timings.style).await;
}
