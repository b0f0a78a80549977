//! The real binary with `--backend kubevirt`, pointed by a kubeconfig at the fake
//! kube-apiserver (tests/fake-kube) and its simulated virt-controller. Each test is a
//! scripted scenario: the API requests it expects must arrive. API server trouble is in
//! `kubevirt_api.rs`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use fake_kube::{FakeKube, Options, Recorded};
use futures_util::future::join_all;
use serde_json::json;
use support::kube::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_starts_a_halted_vm_with_one_patch_and_idle_stops_it_with_one_patch() {
    let c = cluster(Options::default(), |k| {
        k.create_opted_in_vm(NS, "orders", annotations("2s"))
    })
    .await;
    c.activator
        .wait_vm_state(NS, "orders", "stopped", Duration::from_secs(5))
        .await;

    let ids: Vec<String> = (0..50).map(|i| format!("evt-{i}")).collect();
    let codes = join_all(ids.iter().map(|id| c.activator.send_status("/apps/orders", id))).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    let delivered = c.kube.guest_events(NS, "orders");
    assert_eq!(delivered.len(), 50, "every event exactly once: {delivered:?}");
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );

    let patch = c
        .kube
        .expect_request("start patch", Duration::from_secs(1), start_patch("orders"))
        .await;
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&patch.body).unwrap(),
        json!({"spec": {"runStrategy": "Always"}})
    );
    assert_eq!(
        c.kube.count(start_patch("orders")),
        1,
        "exactly one start patch for the burst"
    );

    // Warm path: no request to the API server per event — only the shared activity
    // record, at most once per idle_timeout / 10 (200 ms here).
    let other = |r: &Recorded| !r.is_watch() && !r.is_activity_write(NS, "orders");
    let (before, writes_before) = (c.kube.count(other), c.kube.count(|r| r.is_activity_write(NS, "orders")));
    let started = tokio::time::Instant::now();
    for i in 0..200 {
        assert_eq!(c.activator.send_status("/apps/orders", &format!("warm-{i}")).await, 202);
    }
    let elapsed = started.elapsed();
    assert_eq!(c.kube.count(other), before, "warm events made API requests");
    let writes = c.kube.count(|r| r.is_activity_write(NS, "orders")) - writes_before;
    let bound = (elapsed.as_millis() / 200) as usize + 1;
    assert!(
        writes <= bound,
        "{writes} activity writes for 200 events in {elapsed:?} (bound {bound})"
    );

    // Idle: one stop patch, then the VMI goes away and the VM shows stopped.
    c.kube
        .expect_request("stop patch", Duration::from_secs(10), stop_patch("orders"))
        .await;
    c.activator
        .wait_vm_state(NS, "orders", "stopped", Duration::from_secs(5))
        .await;
    assert!(c.kube.vmi(NS, "orders").is_none());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.kube.count(start_patch("orders")), 1, "one start patch");
    assert_eq!(c.kube.count(|r| r.is_applied_stop(NS, "orders")), 1, "one stop patch");
    assert_eq!(c.kube.vm(NS, "orders").unwrap()["spec"]["runStrategy"], "Halted");

    // The next event starts it again.
    assert_eq!(c.activator.send_status("/apps/orders", "again").await, 202);
    assert_eq!(c.kube.count(start_patch("orders")), 2);
    assert_rbac_covers_every_request(&c.kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_without_the_opt_in_label_is_unknown() {
    let c = cluster(Options::default(), |k| {
        k.create_vm(NS, "private", json!({"app": "db"}), json!({}), json!({}));
        k.create_opted_in_vm(NS, "public", annotations("1m"));
    })
    .await;
    c.activator
        .wait_vm_state(NS, "public", "stopped", Duration::from_secs(5))
        .await;
    let response = c.activator.send("/apps/private", "x").await;
    assert_eq!(response.status(), 404);
    assert_eq!(c.kube.count(|r| r.method == "PATCH"), 0, "nothing may be started");

    // Opting in later (label added) makes it known.
    c.kube.create_vm(
        NS,
        "private",
        json!({"app": "db", "vm-activator.io/enabled": "true"}),
        annotations("1m"),
        json!({}),
    );
    c.activator
        .wait_vm_state(NS, "private", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(c.activator.send_status("/apps/private", "y").await, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_on_deprecated_spec_running_is_started_and_stopped_with_run_strategy() {
    let c = cluster(Options::default(), |k| {
        k.create_vm(
            NS,
            "legacy",
            json!({"vm-activator.io/enabled": "true"}),
            annotations("2s"),
            json!({"running": false}),
        );
    })
    .await;
    c.activator
        .wait_vm_state(NS, "legacy", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(c.activator.send_status("/apps/legacy", "l-1").await, 202);
    let patch = c
        .kube
        .expect_request("start patch", Duration::from_secs(1), start_patch("legacy"))
        .await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&patch.body).unwrap(),
        json!({"spec": {"runStrategy": "Always", "running": null}})
    );
    let vm = c.kube.vm(NS, "legacy").unwrap();
    assert_eq!(vm["spec"]["runStrategy"], "Always");
    assert!(vm["spec"].get("running").is_none());
    c.kube
        .expect_request("stop patch", Duration::from_secs(10), stop_patch("legacy"))
        .await;
    c.activator
        .wait_vm_state(NS, "legacy", "stopped", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_stopped_or_deleted_by_someone_else_answers_held_events_503() {
    let slow_guest = Options {
        guest_delay: Duration::from_secs(30),
        ..Options::default()
    };
    let c = cluster(slow_guest, |k| {
        k.create_opted_in_vm(NS, "a", annotations("1m"));
        k.create_opted_in_vm(NS, "b", annotations("1m"));
    })
    .await;
    c.activator
        .wait_vm_state(NS, "b", "stopped", Duration::from_secs(5))
        .await;

    let held = tokio::spawn({
        let url = format!("{}/apps/a", c.activator.ingress);
        async move { support::post_event(&reqwest::Client::new(), &url, "held").await }
    });
    c.activator
        .wait_vm_state(NS, "a", "probing", Duration::from_secs(5))
        .await;
    c.kube.set_run_strategy(NS, "a", "Halted");
    let status = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(status, 503);

    let held = tokio::spawn({
        let url = format!("{}/apps/b", c.activator.ingress);
        async move { support::post_event(&reqwest::Client::new(), &url, "held").await }
    });
    c.activator
        .wait_vm_state(NS, "b", "probing", Duration::from_secs(5))
        .await;
    c.kube.delete_vm(NS, "b");
    let status = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(status, 503);
    assert!(c.activator.vm(NS, "b").await.is_none(), "a deleted VM leaves /v1/vms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_annotation_is_reported_and_the_default_used() {
    let c = cluster(Options::default(), |k| {
        let mut a = annotations("1m");
        a["vm-activator.io/max-buffered"] = json!("lots");
        k.create_opted_in_vm(NS, "odd", a);
    })
    .await;
    c.activator
        .wait_vm_state(NS, "odd", "stopped", Duration::from_secs(5))
        .await;
    let vm = c.activator.vm(NS, "odd").await.unwrap();
    let warnings = vm["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{vm}");
    assert!(warnings[0].as_str().unwrap().contains("max-buffered"));
    assert_eq!(c.activator.send_status("/apps/odd", "fine").await, 202);
}

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
    assert_eq!(kube.count(start_patch("napper")), 1, "resumed, not booted again");
    assert_eq!(kube.guest_events(NS, "napper"), vec!["one", "two"]);
}
