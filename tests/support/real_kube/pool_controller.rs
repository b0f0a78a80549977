//! The test's VirtualMachinePool controller against the real API server (which has the
//! pool CRD, with its real `/scale` subresource, but no KubeVirt to act on it): for each
//! pool in the namespace, as many virt-launcher pods as `spec.replicas` asks for (named
//! `{pool}-{n}`, labelled as its `spec.selector` selects; the test's kubelet makes them
//! Ready), and the status the `/scale` subresource reads — `replicas`, `readyReplicas`
//! and `labelSelector` (KubeVirt's `.status.labelSelector`) — written when it changes.
//! KubeVirt's pool makes VirtualMachines whose VMIs make the pods; the activator sees only
//! the pods and the scale, which is what is played here.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::ResourceExt;
use serde_json::json;

/// Plays the pool controller in `namespace` until aborted (polling: pools are few and
/// small in the tests).
pub(super) async fn pool_controller(client: kube::Client, namespace: String) {
    let gvk = GroupVersionKind::gvk("pool.kubevirt.io", "v1beta1", "VirtualMachinePool");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "virtualmachinepools");
    let pools: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A bundle without the pool CRD: nothing to play.
        let Ok(list) = pools.list(&ListParams::default()).await else {
            continue;
        };
        for pool in list.items {
            reconcile(&pools, &pods, &pool).await;
        }
    }
}

async fn reconcile(pools: &Api<DynamicObject>, pods: &Api<Pod>, pool: &DynamicObject) {
    let name = pool.name_any();
    let want = pool.data["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
    let labels = pool.data["spec"]["selector"]["matchLabels"].clone();
    let Some(labels) = labels.as_object().filter(|l| !l.is_empty()) else {
        return;
    };
    let selector = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",");
    let Ok(owned) = pods.list(&ListParams::default().labels(&selector)).await else {
        return;
    };
    let live: Vec<&Pod> = owned
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let taken: BTreeSet<String> = owned.items.iter().map(|p| p.name_any()).collect();
    if live.len() < want {
        let mut index = 0;
        for _ in live.len()..want {
            while taken.contains(&format!("{name}-{index}")) {
                index += 1;
            }
            let pod: Pod = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{name}-{index}"), "labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "compute", "image": "quay.io/kubevirt/virt-launcher"}],
                },
            }))
            .expect("a pod");
            let _ = pods.create(&PostParams::default(), &pod).await;
            index += 1;
        }
    } else if live.len() > want {
        let mut names: Vec<String> = live.iter().map(|p| p.name_any()).collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.rsplit('-').next().and_then(|i| i.parse::<u64>().ok())));
        for pod in names.iter().take(live.len() - want) {
            let _ = pods.delete(pod, &DeleteParams::default().grace_period(0)).await;
        }
    }
    let ready = live.iter().filter(|p| is_ready(p)).count();
    let status = json!({"replicas": live.len().min(want), "readyReplicas": ready, "labelSelector": selector});
    if pool.data.get("status") != Some(&status) {
        let patch = json!({"status": status});
        let _ = pools
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
}

fn is_ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
