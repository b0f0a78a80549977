//! The real binary with `--backend kubevirt` against a cluster: the fake kube-apiserver
//! (tests/fake-kube) with its simulated virt-controller, and — where ../shared/k8s is
//! present — a real kube-apiserver with the test playing virt-controller. Each scenario
//! runs on both (`on_fake_and_real!`) and reads as a script: the API requests it expects
//! must arrive. API server trouble is in `kubevirt_api.rs`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use fake_kube::{FakeKube, Options, Recorded};
use futures_util::future::join_all;
use serde_json::json;
use support::kube::*;

on_fake_and_real!(
    a_burst_starts_a_halted_vm_with_one_patch_and_idle_stops_it_with_one_patch,
    a_vm_without_the_opt_in_label_is_unknown,
    a_vm_on_deprecated_spec_running_is_started_and_stopped_with_run_strategy,
    a_vm_stopped_or_deleted_by_someone_else_answers_held_events_503 with Timings {
        guest: Duration::from_secs(30),
        ..Timings::default()
    },
    a_bad_annotation_is_reported_and_the_default_used,
);

/// Starts the binary against `kube` and waits until it is ready.
async fn ready_activator(kube: &impl Kube) -> support::binary::Activator {
    let activator = kube.spawn_activator(&[]).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    activator
}

async fn a_burst_starts_a_halted_vm_with_one_patch_and_idle_stops_it_with_one_patch(kube: impl Kube) {
    let ns = kube.ns().to_string();
    kube.create_opted_in_vm("orders", annotations("2s")).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "orders", "stopped", Duration::from_secs(5))
        .await;

    let path = kube.path("orders");
    let ids: Vec<String> = (0..50).map(|i| format!("evt-{i}")).collect();
    let codes = join_all(ids.iter().map(|id| activator.send_status(&path, id))).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    let delivered = kube.guest_events("orders");
    assert_eq!(delivered.len(), 50, "every event exactly once: {delivered:?}");
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );

    let patch = kube
        .expect_request("start patch", Duration::from_secs(2), start_patch(&ns, "orders"))
        .await;
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&patch.body).unwrap(),
        json!({"spec": {"runStrategy": "Always"}})
    );
    assert_eq!(
        kube.count(start_patch(&ns, "orders")),
        1,
        "exactly one start patch for the burst"
    );

    // Warm path: no request to the API server per event — only the shared activity
    // record, at most once per idle_timeout / 10 (200 ms here).
    let other = |r: &Recorded| !r.is_watch() && !r.is_activity_write(&ns, "orders");
    let (before, writes_before) = (kube.count(other), kube.count(|r| r.is_activity_write(&ns, "orders")));
    let started = tokio::time::Instant::now();
    for i in 0..200 {
        assert_eq!(activator.send_status(&path, &format!("warm-{i}")).await, 202);
    }
    let elapsed = started.elapsed();
    // The audit log may lag the requests a little; the count must not grow.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kube.count(other), before, "warm events made API requests");
    let writes = kube.count(|r| r.is_activity_write(&ns, "orders")) - writes_before;
    let bound = (elapsed.as_millis() / 200) as usize + 2;
    assert!(
        writes <= bound,
        "{writes} activity writes for 200 events in {elapsed:?} (bound {bound})"
    );

    // Idle: one stop patch, then the VMI goes away and the VM shows stopped.
    kube.expect_request("stop patch", Duration::from_secs(10), stop_patch(&ns, "orders"))
        .await;
    activator
        .wait_vm_state(&ns, "orders", "stopped", Duration::from_secs(5))
        .await;
    assert!(kube.vmi("orders").await.is_none());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(kube.count(start_patch(&ns, "orders")), 1, "one start patch");
    assert_eq!(kube.count(|r| r.is_applied_stop(&ns, "orders")), 1, "one stop patch");
    assert_eq!(kube.vm("orders").await.unwrap()["spec"]["runStrategy"], "Halted");

    // The next event starts it again.
    assert_eq!(activator.send_status(&path, "again").await, 202);
    assert_eq!(kube.count(start_patch(&ns, "orders")), 2);
    assert_rbac_covers_every_request(kube.requests());
}

async fn a_vm_without_the_opt_in_label_is_unknown(kube: impl Kube) {
    let ns = kube.ns().to_string();
    kube.create_vm("private", json!({"app": "db"}), json!({}), json!({}))
        .await;
    kube.create_opted_in_vm("public", annotations("1m")).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "public", "stopped", Duration::from_secs(5))
        .await;
    let response = activator.send(&kube.path("private"), "x").await;
    assert_eq!(response.status(), 404);
    assert_eq!(kube.count(|r| r.method == "PATCH"), 0, "nothing may be started");

    // Opting in later (the label added) makes it known.
    let label = json!({"metadata": {"labels": {"vm-activator.io/enabled": "true"}}});
    kube.patch_vm("private", label).await;
    activator
        .wait_vm_state(&ns, "private", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.send_status(&kube.path("private"), "y").await, 202);
}

async fn a_vm_on_deprecated_spec_running_is_started_and_stopped_with_run_strategy(kube: impl Kube) {
    let ns = kube.ns().to_string();
    kube.create_vm(
        "legacy",
        json!({"vm-activator.io/enabled": "true"}),
        annotations("2s"),
        json!({"running": false}),
    )
    .await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "legacy", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.send_status(&kube.path("legacy"), "l-1").await, 202);
    let patch = kube
        .expect_request("start patch", Duration::from_secs(2), start_patch(&ns, "legacy"))
        .await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&patch.body).unwrap(),
        json!({"spec": {"runStrategy": "Always", "running": null}})
    );
    let vm = kube.vm("legacy").await.unwrap();
    assert_eq!(vm["spec"]["runStrategy"], "Always");
    assert!(vm["spec"].get("running").is_none());
    kube.expect_request("stop patch", Duration::from_secs(10), stop_patch(&ns, "legacy"))
        .await;
    activator
        .wait_vm_state(&ns, "legacy", "stopped", Duration::from_secs(5))
        .await;
    assert_rbac_covers_every_request(kube.requests());
}

async fn a_vm_stopped_or_deleted_by_someone_else_answers_held_events_503(kube: impl Kube) {
    let ns = kube.ns().to_string();
    kube.create_opted_in_vm("a", annotations("1m")).await;
    kube.create_opted_in_vm("b", annotations("1m")).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "b", "stopped", Duration::from_secs(5))
        .await;

    let held = tokio::spawn({
        let url = format!("{}{}", activator.ingress, kube.path("a"));
        async move { support::post_event(&reqwest::Client::new(), &url, "held").await }
    });
    activator
        .wait_vm_state(&ns, "a", "probing", Duration::from_secs(5))
        .await;
    kube.set_run_strategy("a", "Halted").await;
    let status = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(status, 503);

    let held = tokio::spawn({
        let url = format!("{}{}", activator.ingress, kube.path("b"));
        async move { support::post_event(&reqwest::Client::new(), &url, "held").await }
    });
    activator
        .wait_vm_state(&ns, "b", "probing", Duration::from_secs(5))
        .await;
    kube.delete_vm("b").await;
    let status = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(status, 503);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while activator.vm(&ns, "b").await.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "a deleted VM leaves /v1/vms");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn a_bad_annotation_is_reported_and_the_default_used(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let mut a = annotations("1m");
    a["vm-activator.io/max-buffered"] = json!("lots");
    kube.create_opted_in_vm("odd", a).await;
    let activator = ready_activator(&kube).await;
    activator
        .wait_vm_state(&ns, "odd", "stopped", Duration::from_secs(5))
        .await;
    let vm = activator.vm(&ns, "odd").await.unwrap();
    let warnings = vm["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{vm}");
    assert!(warnings[0].as_str().unwrap().contains("max-buffered"));
    assert_eq!(activator.send_status(&kube.path("odd"), "fine").await, 202);
}

/// Fake only: the real API server has no `subresources.kubevirt.io` (no virt-api).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_scale_down_pauses_the_vmi_and_the_next_event_resumes_it() {
    let kube = FakeKube::start(Options::default()).await;
    let mut a = annotations("2s");
    a["vm-activator.io/scale-down"] = json!("pause");
    kube.create_opted_in_vm(NS, "napper", a);
    let (_dir, activator) = spawn_with_kubevirt_config(&kube, "pause: true").await;
    activator.wait_status("/readyz", 200, Duration::from_secs(10)).await;
    assert_eq!(activator.send_status("/apps/napper", "one").await, 202);

    let pause = "/apis/subresources.kubevirt.io/v1/namespaces/apps/virtualmachineinstances/napper/pause";
    kube.expect_request("pause", Duration::from_secs(10), |r| {
        r.method == "PUT" && r.path == pause
    })
    .await;
    activator
        .wait_vm_state(NS, "napper", "paused", Duration::from_secs(5))
        .await;
    assert!(kube.vmi(NS, "napper").unwrap()["status"]["conditions"]
        .to_string()
        .contains("Paused"));
    assert_eq!(
        activator
            .metric("vm_activator_scale_downs_total{action=\"pause\",namespace=\"apps\",vm=\"napper\"}")
            .await,
        1.0
    );

    assert_eq!(activator.send_status("/apps/napper", "two").await, 202);
    let unpause = "/apis/subresources.kubevirt.io/v1/namespaces/apps/virtualmachineinstances/napper/unpause";
    assert_eq!(kube.count(|r| r.method == "PUT" && r.path == unpause), 1);
    assert_eq!(kube.count(start_patch(NS, "napper")), 1, "resumed, not booted again");
    assert_eq!(kube.guest_events(NS, "napper"), vec!["one", "two"]);
}
