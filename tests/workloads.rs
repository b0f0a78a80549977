//! Workloads through `/scale` — Deployments, StatefulSets, a Kata Deployment, a custom
//! kind (KubeVirt's VirtualMachinePool) — and Multus networks for pods and VMs: the real
//! binary against the fake API server and, where ../shared/k8s is present, the real one
//! (the test plays scheduler, kubelet, Multus and virt-controller). Each scenario reads as
//! a script of the API requests it expects.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use fake_kube::{Recorded, Res, WorkloadSpec};
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde_json::{json, Value};
use support::binary::Activator;
use support::kube::*;
use support::real_kube::Timings;

on_fake_and_real!(
    a_burst_to_a_deployment_at_zero_scales_it_once_to_the_remembered_count_and_spreads_over_its_pods,
    a_kata_deployment_is_just_a_deployment_and_its_cold_start_phases_are_measured,
    a_statefulset_scales_up_to_its_replicas_annotation_and_down_remembering_it,
    a_scale_made_by_hand_is_followed_not_undone,
    a_pod_dying_mid_stream_loses_no_acknowledged_event,
    multus_picks_the_named_networks_address_for_pods_and_vms,
    two_opted_in_objects_with_one_name_are_refused_until_one_opts_out,
    api_calls_per_cold_start_and_scale_down_for_each_kind,
    a_configured_scale_kind_is_managed_like_a_deployment,
);

/// Annotations of a workload served on port 8080 with `/healthz` as readiness.
fn settings(idle: &str, more: Value) -> Value {
    let mut annotations = annotations(idle);
    json_patch::merge(&mut annotations, &more);
    annotations
}

async fn ready_activator(kube: &impl Kube) -> Activator {
    let activator = kube.spawn_activator(&[]).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    activator
}

/// Waits until `/v1/vms` shows `name` with `count` endpoints taking traffic. On failure
/// it also says what the pods were while the workload was up, which tells the cluster's
/// side from the activator's.
async fn wait_endpoints(kube: &impl Kube, activator: &Activator, name: &str, count: usize, limit: Duration) -> Value {
    let ns = kube.ns();
    let deadline = tokio::time::Instant::now() + limit;
    let mut pods_while_up = Vec::new();
    loop {
        let vm = activator.vm(ns, name).await.unwrap_or_default();
        if vm["endpoints"].as_array().map(Vec::len) == Some(count) {
            return vm;
        }
        if vm["state"] != "stopped" {
            pods_while_up = kube
                .pods()
                .await
                .iter()
                .map(|p| {
                    format!(
                        "{} {} {}",
                        p["metadata"]["name"], p["status"]["phase"], p["status"]["podIP"]
                    )
                })
                .collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ns}/{name} never had {count} endpoints: {vm}; pods while it was up: {pods_while_up:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the workload's `spec.replicas` is `replicas`.
async fn wait_replicas(kube: &impl Kube, res: Res, name: &str, replicas: u64, limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let object = kube.object(res, name).await.expect("the workload exists");
        if object["spec"]["replicas"] == json!(replicas) {
            return object;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {replicas} replicas: {}",
            object["spec"]
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every event id the workload's pods accepted, in one list.
fn all_events(events: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    events.values().flatten().cloned().collect()
}

async fn a_burst_to_a_deployment_at_zero_scales_it_once_to_the_remembered_count_and_spreads_over_its_pods(
    kube: impl Kube,
) {
    let ns = kube.ns().to_string();
    let mut spec = kube.workload_spec(
        Res::Deployment,
        "web",
        settings(
            "3s",
            json!({"vm-activator.io/scaled-down-from": "3", "vm-activator.io/concurrency": "4"}),
        ),
    );
    spec.replicas = 0;
    kube.create_workload(&spec).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "web", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.vm(&ns, "web").await.unwrap()["kind"], "Deployment");

    let path = kube.path("web");
    let ids: Vec<String> = (0..200).map(|i| format!("evt-{i}")).collect();
    let codes = join_all(ids.iter().map(|id| activator.send_status(&path, id))).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    let delivered = all_events(&kube.workload_events("web"));
    assert_eq!(delivered.len(), 200, "every event exactly once");
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );

    // One scale-up, to the remembered count, on condition of the version it saw. (On the
    // real server the Deployment controller may write the object's status between the
    // store's view and the patch: that patch gets 409, re-reads `/scale` and patches
    // again — more calls, still one applied.)
    let scale = |r: &Recorded| r.is_scale_patch(Res::Deployment, &ns, "web");
    let applied = |r: &Recorded| scale(r) && (200..300).contains(&r.status);
    assert_eq!(kube.count(applied), 1, "one /scale applied for the burst");
    let call = kube.expect_request("scale up", Duration::from_secs(1), applied).await;
    let body: Value = serde_json::from_str(&call.body).unwrap();
    assert_eq!(body["spec"]["replicas"], 3);
    assert!(body["metadata"]["resourceVersion"].is_string(), "{body}");

    // Warm: with 4 in flight per pod at most, 60 concurrent events use every pod.
    let vm = wait_endpoints(&kube, &activator, "web", 3, Duration::from_secs(10)).await;
    assert_eq!(vm["state"], "ready");
    let before = kube.workload_events("web");
    let warm: Vec<String> = (0..60).map(|i| format!("warm-{i}")).collect();
    let codes = join_all(warm.iter().map(|id| activator.send_status(&path, id))).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    let after = kube.workload_events("web");
    let per_pod: Vec<usize> = after
        .iter()
        .map(|(pod, events)| events.len() - before.get(pod).map_or(0, Vec::len))
        .collect();
    assert_eq!(per_pod.len(), 3, "{after:?}");
    assert!(
        per_pod.iter().all(|n| *n > 0),
        "spread over every ready pod: {per_pod:?}"
    );

    // Idle: scaled to zero, the count remembered; the pods go.
    wait_replicas(&kube, Res::Deployment, "web", 0, Duration::from_secs(15)).await;
    activator
        .wait_vm_state(&ns, "web", "stopped", Duration::from_secs(10))
        .await;
    let web = kube.object(Res::Deployment, "web").await.unwrap();
    assert_eq!(web["metadata"]["annotations"]["vm-activator.io/scaled-down-from"], "3");
    assert_eq!(
        activator
            .metric(&format!(
                "vm_activator_scale_downs_total{{action=\"stop\",namespace=\"{ns}\",vm=\"web\"}}"
            ))
            .await,
        1.0
    );

    // The next event brings all three back.
    assert_eq!(activator.send_status(&path, "again").await, 202);
    // Up, down, up.
    assert_eq!(kube.count(applied), 3);
    assert_eq!(
        wait_replicas(&kube, Res::Deployment, "web", 3, Duration::from_secs(1)).await["spec"]["replicas"],
        3
    );
    assert_rbac_covers_every_request(kube.requests());
}

async fn a_kata_deployment_is_just_a_deployment_and_its_cold_start_phases_are_measured(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let mut spec = kube.workload_spec(Res::Deployment, "kata", settings("1m", json!({})));
    spec.runtime_class = Some("kata-qemu".into());
    kube.create_workload(&spec).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "kata", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.send_status(&kube.path("kata"), "k-1").await, 202);
    assert_eq!(all_events(&kube.workload_events("kata")), ["k-1"]);
    let kata = kube.object(Res::Deployment, "kata").await.unwrap();
    assert_eq!(kata["spec"]["template"]["spec"]["runtimeClassName"], "kata-qemu");
    assert_eq!(kata["spec"]["replicas"], 1, "no count remembered, none configured: 1");
    // Where the time went: the start call, scheduling + boot until a pod is ready, the probe.
    for phase in ["start_call", "boot", "probe"] {
        let series =
            format!("vm_activator_cold_start_phase_seconds_count{{namespace=\"{ns}\",phase=\"{phase}\",vm=\"kata\"}}");
        assert_eq!(activator.metric(&series).await, 1.0, "{series}");
    }
    let info = format!("vm_activator_target_info{{kind=\"Deployment\",namespace=\"{ns}\",vm=\"kata\"}}");
    assert_eq!(activator.metric(&info).await, 1.0);
}

async fn a_statefulset_scales_up_to_its_replicas_annotation_and_down_remembering_it(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let spec = kube.workload_spec(
        Res::StatefulSet,
        "ledger",
        // Idle long enough that a loaded machine still sees both pods serve.
        settings("6s", json!({"vm-activator.io/replicas": "2"})),
    );
    kube.create_workload(&spec).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "ledger", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.vm(&ns, "ledger").await.unwrap()["kind"], "StatefulSet");
    assert_eq!(activator.send_status(&kube.path("ledger"), "l-1").await, 202);
    wait_replicas(&kube, Res::StatefulSet, "ledger", 2, Duration::from_secs(1)).await;
    // A StatefulSet makes its pods one at a time: both end up serving.
    wait_endpoints(&kube, &activator, "ledger", 2, Duration::from_secs(10)).await;
    let pods: Vec<String> = kube.workload_events("ledger").into_keys().collect();
    assert_eq!(pods, ["ledger-0", "ledger-1"]);

    wait_replicas(&kube, Res::StatefulSet, "ledger", 0, Duration::from_secs(30)).await;
    activator
        .wait_vm_state(&ns, "ledger", "stopped", Duration::from_secs(10))
        .await;
    let ledger = kube.object(Res::StatefulSet, "ledger").await.unwrap();
    assert_eq!(
        ledger["metadata"]["annotations"]["vm-activator.io/scaled-down-from"],
        "2"
    );
    assert_eq!(activator.send_status(&kube.path("ledger"), "l-2").await, 202);
    assert_rbac_covers_every_request(kube.requests());
}

async fn a_scale_made_by_hand_is_followed_not_undone(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let spec = kube.workload_spec(Res::Deployment, "api", settings("1m", json!({})));
    kube.create_workload(&spec).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "api", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.send_status(&kube.path("api"), "a-1").await, 202);
    wait_endpoints(&kube, &activator, "api", 1, Duration::from_secs(5)).await;
    // Applied scale calls (a real controller's status write may make one meet a 409 first).
    let scale = |r: &Recorded| r.is_scale_patch(Res::Deployment, &ns, "api") && (200..300).contains(&r.status);
    assert_eq!(kube.count(scale), 1);

    // Someone scales it to 3: the new pods take traffic; nobody scales it back.
    kube.scale_by_hand(Res::Deployment, "api", 3).await;
    wait_endpoints(&kube, &activator, "api", 3, Duration::from_secs(10)).await;
    for i in 0..10 {
        assert_eq!(activator.send_status(&kube.path("api"), &format!("a-{i}+")).await, 202);
    }
    assert_eq!(kube.count(scale), 1, "the activator did not touch the hand-made scale");
    assert_eq!(
        kube.object(Res::Deployment, "api").await.unwrap()["spec"]["replicas"],
        3
    );

    // Someone scales it to 0: followed (stopped), not restarted until an event comes.
    kube.scale_by_hand(Res::Deployment, "api", 0).await;
    activator
        .wait_vm_state(&ns, "api", "stopped", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kube.count(scale), 1);
    assert_eq!(
        kube.object(Res::Deployment, "api").await.unwrap()["spec"]["replicas"],
        0
    );
    assert_eq!(activator.send_status(&kube.path("api"), "a-back").await, 202);
    assert_eq!(kube.count(scale), 2);
}

async fn a_pod_dying_mid_stream_loses_no_acknowledged_event(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let spec = kube.workload_spec(
        Res::Deployment,
        "stream",
        settings("1m", json!({"vm-activator.io/replicas": "2"})),
    );
    kube.create_workload(&spec).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "stream", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.send_status(&kube.path("stream"), "warm").await, 202);
    wait_endpoints(&kube, &activator, "stream", 2, Duration::from_secs(10)).await;
    let victim = kube
        .pods()
        .await
        .into_iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
        .find(|name| name.starts_with("stream-"))
        .expect("a pod");

    // 300 events, 8 at a time; the pod dies a third of the way through.
    let path = kube.path("stream");
    let answers: Vec<(String, u16)> = futures_util::stream::iter(0..300)
        .map(|i| {
            let (activator, path, kube, victim) = (&activator, &path, &kube, &victim);
            async move {
                if i == 100 {
                    kube.kill_pod(victim).await;
                }
                let id = format!("s-{i}");
                let code = activator.send_status(path, &id).await;
                (id, code)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let accepted: HashSet<String> = all_events(&kube.workload_events("stream")).into_iter().collect();
    for (id, code) in &answers {
        match code {
            202 => assert!(accepted.contains(id), "{id} was acknowledged but no pod has it"),
            // Refused, never acknowledged: the sender retries (Knative's delivery).
            502 | 503 => {}
            other => panic!("{id}: unexpected {other}"),
        }
    }
    // The retries get through: the replacement pod and the survivor serve them.
    for (id, code) in answers.iter().filter(|(_, code)| *code != 202) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut code = *code;
        while code != 202 {
            assert!(tokio::time::Instant::now() < deadline, "{id} never delivered");
            tokio::time::sleep(Duration::from_millis(50)).await;
            code = activator.send_status(&path, id).await;
        }
    }
    let accepted: HashSet<String> = all_events(&kube.workload_events("stream")).into_iter().collect();
    assert!(answers.iter().all(|(id, _)| accepted.contains(id)));
    let refused = answers.iter().filter(|(_, c)| *c != 202).count();
    eprintln!("pod {victim} killed mid-stream: {refused} of 300 events answered 502/503 and retried");
}

async fn multus_picks_the_named_networks_address_for_pods_and_vms(kube: impl Kube) {
    let ns = kube.ns().to_string();
    // A Deployment whose pods are on the vlan-10 network; the guest answers there only.
    let mut on_vlan = kube.workload_spec(
        Res::Deployment,
        "edge",
        settings("1m", json!({"vm-activator.io/network": "vlan-10"})),
    );
    on_vlan.pod_annotations = json!({"k8s.v1.cni.cncf.io/networks": "vlan-10"});
    kube.create_workload(&on_vlan).await;
    // One that names a network its pods are not on: never ready, never the pod IP.
    let mut wrong = kube.workload_spec(
        Res::Deployment,
        "lost",
        settings(
            "1m",
            json!({"vm-activator.io/network": "vlan-20", "vm-activator.io/start-timeout": "2s"}),
        ),
    );
    wrong.pod_annotations = json!({"k8s.v1.cni.cncf.io/networks": "vlan-10"});
    kube.create_workload(&wrong).await;
    // A VM with a second interface on vlan-10.
    kube.create_vm(
        "router",
        json!({"vm-activator.io/enabled": "true"}),
        settings("1m", json!({"vm-activator.io/network": "vlan-10"})),
        json!({"template": {"spec": {"networks": [
            {"name": "default", "pod": {}},
            {"name": "vlan", "multus": {"networkName": "vlan-10"}},
        ]}}}),
    )
    .await;
    let activator = ready_activator(&kube).await;

    assert_eq!(activator.send_status(&kube.path("edge"), "e-1").await, 202);
    assert_eq!(all_events(&kube.workload_events("edge")), ["e-1"]);
    let vm = wait_endpoints(&kube, &activator, "edge", 1, Duration::from_secs(5)).await;
    let pod = kube
        .pods()
        .await
        .into_iter()
        .find(|p| p["metadata"]["name"].as_str().unwrap_or_default().starts_with("edge-"))
        .unwrap();
    let status: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let vlan_ip = status
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == format!("{ns}/vlan-10"))
        .unwrap()["ips"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(vm["endpoints"], json!([format!("{vlan_ip}:8080")]));
    assert_ne!(pod["status"]["podIP"].as_str(), Some(vlan_ip.as_str()));

    // While it waits for an address on vlan-20, /v1/vms says why; then 503.
    let path = kube.path("lost");
    let (refused, reason) = tokio::join!(activator.send(&path, "l-1"), async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let lost = activator.vm(&ns, "lost").await.unwrap_or_default();
            let reason = lost["reason"].as_str().unwrap_or_default().to_string();
            if reason.contains("not attached to network") || tokio::time::Instant::now() > deadline {
                break reason;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(
        reason.contains(&format!("not attached to network {ns}/vlan-20")),
        "{reason}"
    );
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"], "start_timeout");
    assert!(kube.workload_events("lost").values().all(Vec::is_empty));

    assert_eq!(activator.send_status(&kube.path("router"), "r-1").await, 202);
    assert_eq!(kube.guest_events("router"), ["r-1"]);
    let vmi = kube.vmi("router").await.unwrap();
    let vlan = vmi["status"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "vlan")
        .unwrap()["ipAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        activator.vm(&ns, "router").await.unwrap()["endpoint"],
        format!("{vlan}:8080")
    );
}

async fn two_opted_in_objects_with_one_name_are_refused_until_one_opts_out(kube: impl Kube) {
    let ns = kube.ns().to_string();
    kube.create_opted_in_vm("shop", annotations("1m")).await;
    kube.create_workload(&kube.workload_spec(Res::Deployment, "shop", settings("1m", json!({}))))
        .await;
    let activator = ready_activator(&kube).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let listed = loop {
        let vm = activator.vm(&ns, "shop").await.unwrap_or_default();
        if vm["refused"].is_string() || tokio::time::Instant::now() > deadline {
            break vm;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let reason = listed["refused"].as_str().expect("listed as refused");
    assert!(reason.contains("VirtualMachine and Deployment"), "{reason}");
    assert_eq!(listed["kind"], "VirtualMachine,Deployment");

    let answer = activator.send(&kube.path("shop"), "s-1").await;
    assert_eq!(answer.status(), 409);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "conflict");
    assert!(body["detail"].as_str().unwrap().contains("remove the label"), "{body}");
    let rejected = format!("vm_activator_rejected_total{{namespace=\"{ns}\",reason=\"conflict\",vm=\"shop\"}}");
    assert_eq!(activator.metric(&rejected).await, 1.0);
    let writes = |r: &Recorded| r.method == "PATCH";
    assert_eq!(kube.count(writes), 0, "nothing started for a refused name");

    // The VM opts out: the Deployment is served.
    kube.patch_vm(
        "shop",
        json!({"metadata": {"labels": {"vm-activator.io/enabled": null}}}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while activator.vm(&ns, "shop").await.unwrap_or_default()["kind"] != "Deployment" {
        assert!(tokio::time::Instant::now() < deadline, "still refused");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(activator.send_status(&kube.path("shop"), "s-2").await, 202);
    assert_eq!(all_events(&kube.workload_events("shop")), ["s-2"]);
    assert!(kube.vmi("shop").await.is_none(), "the VM was never started");
}

/// The calls one target's cold start and scale-down make, in order (lists and watches
/// left out), under the fixed idle timeout and under the adaptive policy: the same calls
/// — the adaptive policy's history rides on the scale-down's own JSON patch. Printed as
/// a table; each kind's are asserted exactly.
async fn api_calls_per_cold_start_and_scale_down_for_each_kind(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let policies = [
        ("", json!({})),
        ("-a", json!({"vm-activator.io/idle-policy": "adaptive"})),
    ];
    for (suffix, policy) in &policies {
        kube.create_opted_in_vm(&format!("vm{suffix}"), settings("2s", policy.clone()))
            .await;
        for res in [Res::Deployment, Res::StatefulSet] {
            let name = format!("{}{suffix}", res.plural().trim_end_matches('s'));
            kube.create_workload(&kube.workload_spec(res, &name, settings("2s", policy.clone())))
                .await;
        }
    }
    let activator = ready_activator(&kube).await;
    let records = |from: usize| -> Vec<Recorded> {
        // A scale-up or -down that lost a race with the real controller's status write
        // (409, then a re-read of `/scale` or of the object) is the same cold start or
        // scale-down: the retry is not counted (a_scale_down_that_meets_status_writes…
        // counts it).
        let raced = |r: &Recorded| r.status == 409 || (r.method == "GET" && !r.is_list_or_watch());
        // Kubernetes Events are writes of their own (one per scale action, asserted in
        // tests/kubevirt_api.rs), not part of starting or stopping.
        let event = |r: &Recorded| r.path.starts_with("/apis/events.k8s.io/");
        kube.requests()[from..]
            .iter()
            .filter(|r| !r.is_list_or_watch() && !raced(r) && !event(r))
            .cloned()
            .collect()
    };
    let expect = |resource: &str, start: &str, stop: &[&str]| -> (Vec<String>, Vec<String>) {
        (
            vec![start.to_string(), format!("PATCH {resource} (merge patch)")],
            stop.iter().map(|s| s.to_string()).collect(),
        )
    };
    let expected = |suffix: &str| {
        [
            expect(
                &format!("virtualmachines/vm{suffix}"),
                &format!("PATCH virtualmachines/vm{suffix} (merge patch)"),
                &[&format!("PATCH virtualmachines/vm{suffix} (JSON patch)")],
            ),
            expect(
                &format!("deployments/deployment{suffix}"),
                &format!("PATCH deployments/deployment{suffix}/scale (merge patch)"),
                &[
                    &format!("PATCH deployments/deployment{suffix} (JSON patch)"),
                    &format!("PATCH deployments/deployment{suffix}/scale (merge patch)"),
                ],
            ),
            expect(
                &format!("statefulsets/statefulset{suffix}"),
                &format!("PATCH statefulsets/statefulset{suffix}/scale (merge patch)"),
                &[
                    &format!("PATCH statefulsets/statefulset{suffix} (JSON patch)"),
                    &format!("PATCH statefulsets/statefulset{suffix}/scale (merge patch)"),
                ],
            ),
        ]
    };
    // Waits until `from` is followed by at least `count` calls (the audit log of the
    // real API server lags a little), then takes them.
    let wait_calls = |from: usize, count: usize| {
        let records = &records;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while records(from).len() < count && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Anything more than expected would show up here too.
            tokio::time::sleep(Duration::from_millis(300)).await;
            records(from)
        }
    };
    let mut table = Vec::new();
    for (suffix, _) in &policies {
        for ((name, kind), (want_cold, want_down)) in [
            ("vm", "VirtualMachine"),
            ("deployment", "Deployment"),
            ("statefulset", "StatefulSet"),
        ]
        .into_iter()
        .zip(expected(suffix))
        {
            let name = format!("{name}{suffix}");
            activator
                .wait_vm_state(&ns, &name, "stopped", Duration::from_secs(5))
                .await;
            let mark = kube.requests().len();
            assert_eq!(
                activator.send_status(&kube.path(&name), &format!("{name}-1")).await,
                202
            );
            // The activity record follows the first delivered event.
            let cold = wait_calls(mark, want_cold.len()).await;
            let mark = kube.requests().len();
            activator
                .wait_vm_state(&ns, &name, "stopped", Duration::from_secs(15))
                .await;
            let down = wait_calls(mark, want_down.len()).await;
            table.push((format!("{kind}{suffix}"), cold, down, want_cold, want_down));
        }
    }
    let summary = |records: &[Recorded]| records.iter().map(|r| r.summary()).collect::<Vec<_>>();
    for (kind, cold, down, ..) in &table {
        eprintln!("{kind}: cold start {:?}; scale-down {:?}", summary(cold), summary(down));
        for r in cold.iter().chain(down) {
            eprintln!("  {} {} {}", r.summary(), r.status, r.body);
        }
    }
    for (kind, cold, down, want_cold, want_down) in &table {
        assert_eq!(
            &summary(cold),
            want_cold,
            "{kind} cold start: start call, then the activity record"
        );
        assert_eq!(&summary(down), want_down, "{kind} scale-down");
        // The adaptive policy's history is in the scale-down's first patch, and only there.
        let adaptive = kind.ends_with("-a");
        let carries_history = |r: &Recorded| r.body.contains("vm-activator.io~1idle-history");
        assert_eq!(carries_history(&down[0]), adaptive, "{kind}: {}", down[0].body);
        assert!(!cold.iter().chain(&down[1..]).any(carries_history), "{kind}");
    }
}

/// A custom `/scale` kind from config: KubeVirt's VirtualMachinePool (`pool.kubevirt.io/v1beta1`,
/// the version KubeVirt stores), with the component's RBAC. On the real server its CRD
/// and `/scale` subresource are KubeVirt's and the test plays the pool controller.
async fn a_configured_scale_kind_is_managed_like_a_deployment(kube: impl Kube) {
    let ns = kube.ns().to_string();
    kube.grant_component_rbac("virtualmachinepools").await;
    let mut pool = WorkloadSpec::opted_in(Res::VmPool, &ns, "pool");
    // Idle long enough that a loaded machine still sees it running with both pods.
    pool.annotations = settings("6s", json!({"vm-activator.io/replicas": "2"}));
    pool.pod_labels = json!({"kubevirt.io/vmpool": "pool"});
    kube.create_workload(&pool).await;
    let activator = kube
        .spawn_activator_with_kubevirt(
            "scale_kinds: [{group: pool.kubevirt.io, version: v1beta1, kind: VirtualMachinePool, plural: virtualmachinepools}]",
        )
        .await;
    activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    activator
        .wait_vm_state(&ns, "pool", "stopped", Duration::from_secs(10))
        .await;
    assert_eq!(activator.vm(&ns, "pool").await.unwrap()["kind"], "VirtualMachinePool");
    assert_eq!(activator.send_status(&kube.path("pool"), "p-1").await, 202);
    assert_eq!(all_events(&kube.workload_events("pool")), ["p-1"]);
    // Scaled up once, to the replicas annotation: one `/scale` patch where the requests
    // are recorded (the fake; the real server's audit policy leaves out pool.kubevirt.io).
    assert_eq!(kube.object(Res::VmPool, "pool").await.unwrap()["spec"]["replicas"], 2);
    let series = format!("vm_activator_scale_ups_total{{namespace=\"{ns}\",vm=\"pool\"}}");
    assert_eq!(activator.metric(&series).await, 1.0);
    let scale = |r: &Recorded| r.is_scale_patch(Res::VmPool, &ns, "pool");
    assert!(kube.count(scale) <= 1, "one scale patch");
    wait_endpoints(&kube, &activator, "pool", 2, Duration::from_secs(10)).await;
    wait_replicas(&kube, Res::VmPool, "pool", 0, Duration::from_secs(30)).await;
    let pool = kube.object(Res::VmPool, "pool").await.unwrap();
    assert_eq!(pool["metadata"]["annotations"]["vm-activator.io/scaled-down-from"], "2");
    assert_rbac_covers_every_request(kube.requests());
}

/// A Deployment controller rewriting the status races the scale-up again and again: each
/// 409 is followed by a re-read of `/scale` and one more patch, until one applies — the
/// held event is delivered, the workload scaled up once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_up_that_keeps_losing_to_status_writes_reads_again_until_it_applies() {
    let cluster = FakeCluster::start(Timings::default()).await;
    let kube = &cluster.kube;
    let ns = cluster.ns().to_string();
    let mut web = WorkloadSpec::opted_in(Res::Deployment, &ns, "web");
    web.annotations = settings("1m", json!({"vm-activator.io/replicas": "2"}));
    web.replicas = 0;
    kube.create_workload(&web);
    let activator = ready_activator(&cluster).await;
    activator
        .wait_vm_state(&ns, "web", "stopped", Duration::from_secs(5))
        .await;
    kube.race_scale_patches(3);
    assert_eq!(activator.send_status(&cluster.path("web"), "raced").await, 202);
    assert_eq!(all_events(&cluster.workload_events("web")), ["raced"]);
    let scale = |r: &Recorded| r.is_scale_patch(Res::Deployment, &ns, "web");
    let codes: Vec<u16> = kube.requests().iter().filter(|r| scale(r)).map(|r| r.status).collect();
    assert_eq!(codes, [409, 409, 409, 200]);
    let get_scale = |r: &Recorded| r.method == "GET" && r.path.ends_with("/deployments/web/scale");
    assert_eq!(kube.count(get_scale), 3, "one re-read per conflict");
    assert_eq!(kube.object(Res::Deployment, &ns, "web").unwrap()["spec"]["replicas"], 2);
}

/// The flake of `api_calls_per_cold_start_and_scale_down_for_each_kind::real` under load,
/// made deterministic: the Deployment controller writes the status between the
/// scale-down's JSON patch and its `/scale` patch, which then gets 409. The scale-down
/// used to be called off ("a peer is active") and tried again an idle check later — one
/// more JSON patch, the workload up for longer. Now the object is read again: only its
/// status changed, so `/scale` is patched again and applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_that_meets_status_writes_reads_again_and_applies() {
    let cluster = FakeCluster::start(Timings::default()).await;
    let kube = &cluster.kube;
    let ns = cluster.ns().to_string();
    let mut web = WorkloadSpec::opted_in(Res::Deployment, &ns, "web");
    web.annotations = settings("1s", json!({}));
    web.replicas = 0;
    kube.create_workload(&web);
    let activator = ready_activator(&cluster).await;
    activator
        .wait_vm_state(&ns, "web", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.send_status(&cluster.path("web"), "one").await, 202);
    let mark = kube.requests().len();
    kube.race_scale_patches(2);
    wait_replicas(&cluster, Res::Deployment, "web", 0, Duration::from_secs(15)).await;
    let after = &kube.requests()[mark..];
    let compares = after
        .iter()
        .filter(|r| r.is_object_patch(Res::Deployment, &ns, "web") && r.content_type.contains("json-patch"))
        .count();
    assert_eq!(compares, 1, "one compare-and-scale-down");
    let scales: Vec<u16> = after
        .iter()
        .filter(|r| r.is_scale_patch(Res::Deployment, &ns, "web"))
        .map(|r| r.status)
        .collect();
    assert_eq!(scales, [409, 409, 200]);
    let reads = |r: &&Recorded| r.method == "GET" && r.path.ends_with("/deployments/web");
    assert_eq!(after.iter().filter(reads).count(), 2, "one read per conflict");
}

/// The fake's watches, as kube-apiserver's, pass changes on in resourceVersion order and
/// skip anything at or below the last version they passed on — so the fake must publish
/// changes in version order. The flake "a pool's (StatefulSet's) second endpoint never
/// passes its probe" was this: two pods marked Running by two threads at once were
/// published in the other order, the activator's pod watch skipped the older one and
/// never learnt that pod's address (found with `tests/soak.sh` and debug logs: the
/// backend's status listed 2 of 3 Running pods until the idle scale-down). Writers on
/// four threads at once: a watch sees every change (before the fix it lost 4 to 16 of
/// the 2,000 in every run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_s_watches_miss_no_change_written_concurrently() {
    let kube = fake_kube::FakeKube::start(fake_kube::Options::default()).await;
    let url = format!(
        "http://{}/apis/kubevirt.io/v1/namespaces/race/virtualmachines?watch=true&resourceVersion=1&timeoutSeconds=3",
        kube.addr()
    );
    let watch = tokio::spawn(async move { reqwest::get(url).await.unwrap().text().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (threads, each) = (4, 500);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let kube = &kube;
            scope.spawn(move || {
                for i in 0..each {
                    kube.create_vm("race", &format!("vm-{t}-{i}"), json!({}), json!({}), json!({}));
                }
            });
        }
    });
    let lines = watch.await.unwrap();
    let added = lines.lines().filter(|l| l.contains("\"ADDED\"")).count();
    assert_eq!(added, threads * each, "changes the watch never passed on");
}

/// The fake answers `/scale` as kube-apiserver does: 409 on a stale resourceVersion,
/// 422 for a bad count, 404 for a kind without `/scale` or an unknown one.
#[tokio::test]
async fn the_fake_scale_subresource_behaves_like_the_api_server() {
    let kube = fake_kube::FakeKube::start(fake_kube::Options::default()).await;
    kube.create_workload(&WorkloadSpec::opted_in(Res::Deployment, "apps", "web"));
    let client = reqwest::Client::new();
    let base = format!("http://{}/apis/apps/v1/namespaces/apps", kube.addr());
    let scale: Value = client
        .get(format!("{base}/deployments/web/scale"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["status"]["selector"], "app=web");
    let rv = scale["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let patch = |body: Value| {
        client
            .patch(format!("{base}/deployments/web/scale"))
            .header("content-type", "application/merge-patch+json")
            .body(body.to_string())
            .send()
    };
    assert_eq!(patch(json!({"spec": {"replicas": -1}})).await.unwrap().status(), 422);
    let at = |replicas: u64| json!({"metadata": {"resourceVersion": rv}, "spec": {"replicas": replicas}});
    assert_eq!(patch(at(2)).await.unwrap().status(), 200);
    assert_eq!(
        patch(at(3)).await.unwrap().status(),
        409,
        "the version it was read at is stale now"
    );
    let missing = client.get(format!("{base}/pods/web/scale")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let unknown = client
        .get(format!(
            "http://{}/apis/example.com/v1/namespaces/apps/widgets",
            kube.addr()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}
