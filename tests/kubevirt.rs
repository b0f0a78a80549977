//! The real binary with `--backend kubevirt`, pointed by a kubeconfig at the fake
//! kube-apiserver (tests/fake-kube) and its simulated virt-controller. Each test is a
//! scripted scenario: the API requests it expects must arrive.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use fake_kube::{FakeKube, Options, Recorded};
use futures_util::future::join_all;
use serde_json::json;
use support::binary::Activator;

const NS: &str = "apps";

fn annotations(idle: &str) -> serde_json::Value {
    json!({
        "vm-activator.io/port": "8080",
        "vm-activator.io/readiness": "http:/healthz",
        "vm-activator.io/idle-timeout": idle,
        "vm-activator.io/start-timeout": "20s",
    })
}

struct Cluster {
    kube: FakeKube,
    _dir: tempfile::TempDir,
    activator: Activator,
}

async fn cluster(options: Options, setup: impl FnOnce(&FakeKube)) -> Cluster {
    let kube = FakeKube::start(options).await;
    setup(&kube);
    let (dir, activator) = spawn_with_kubeconfig(&kube).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(10)).await;
    Cluster {
        kube,
        _dir: dir,
        activator,
    }
}

/// Every request the activator made is allowed by the RBAC it ships with
/// (`API_ACCESS`, which tests/manifests.rs checks against deploy/base/rbac.yaml).
fn assert_rbac_covers_every_request(kube: &FakeKube) {
    use vm_activator::backend::kubevirt::API_ACCESS;
    for r in kube.requests() {
        let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        assert_eq!(parts[0], "apis", "{r:?}");
        let group = parts[1];
        let rest = if parts.get(3) == Some(&"namespaces") {
            &parts[5..]
        } else {
            &parts[3..]
        };
        let resource = match rest.get(2) {
            Some(sub) => format!("{}/{sub}", rest[0]),
            None => rest[0].to_string(),
        };
        let verb = match (r.method.as_str(), rest.len() > 1) {
            ("GET", false) if r.is_watch() => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("PATCH", _) => "patch",
            ("PUT", _) => "update",
            ("POST", _) => "create",
            ("DELETE", _) => "delete",
            (m, _) => panic!("unexpected method {m}"),
        };
        let allowed = API_ACCESS
            .iter()
            .any(|(g, res, verbs)| *g == group && *res == resource && verbs.contains(&verb));
        assert!(allowed, "{verb} {group}/{resource} is not in the shipped RBAC: {r:?}");
    }
}

/// The binary with `--backend kubevirt` and a kubeconfig for `kube`; the directory
/// holding the kubeconfig must outlive the process.
async fn spawn_with_kubeconfig(kube: &FakeKube) -> (tempfile::TempDir, Activator) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let activator = Activator::spawn_kubevirt(&kubeconfig, &[]).await;
    (dir, activator)
}

/// The binary with a config file selecting the kubevirt backend (pointed at `kube`) plus
/// one more `kubevirt:` key; the directory must outlive the process.
async fn spawn_with_kubevirt_config(kube: &FakeKube, kubevirt_key: &str) -> (tempfile::TempDir, Activator) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let config = dir.path().join("config.yaml");
    let text = format!(
        "backend: kubevirt\nkubevirt:\n  kubeconfig: {}\n  {kubevirt_key}\n",
        kubeconfig.display()
    );
    std::fs::write(&config, text).unwrap();
    let activator = Activator::spawn(&["--config", config.to_str().unwrap(), "--auth", "none"]).await;
    (dir, activator)
}

fn start_patch(name: &'static str) -> impl Fn(&Recorded) -> bool {
    move |r| {
        r.is_vm_patch(NS, name)
            && r.content_type.starts_with("application/merge-patch+json")
            && r.body.contains("\"runStrategy\":\"Always\"")
    }
}

fn stop_patch(name: &'static str) -> impl Fn(&Recorded) -> bool {
    move |r| r.is_vm_patch(NS, name) && r.body.contains("\"Halted\"")
}

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
async fn api_server_down_means_503_and_readyz_false_then_recovery_without_restart() {
    let c = cluster(Options::default(), |k| {
        k.create_opted_in_vm(NS, "svc", annotations("1m"))
    })
    .await;
    c.activator
        .wait_vm_state(NS, "svc", "stopped", Duration::from_secs(5))
        .await;

    c.kube.set_down(true).await;
    c.activator.wait_status("/readyz", 503, Duration::from_secs(10)).await;
    let refused = tokio::time::timeout(Duration::from_secs(10), c.activator.send("/apps/svc", "while-down"))
        .await
        .expect("never a hang");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));

    c.kube.set_down(false).await;
    c.activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    assert_eq!(c.activator.send_status("/apps/svc", "after").await, 202);
    assert_eq!(c.kube.guest_events(NS, "svc"), vec!["after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_recovers_without_losing_readiness() {
    let c = cluster(Options::default(), |k| {
        k.create_opted_in_vm(NS, "steady", annotations("10m"))
    })
    .await;
    c.activator
        .wait_vm_state(NS, "steady", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(c.activator.send_status("/apps/steady", "before").await, 202);
    c.activator
        .wait_vm_state(NS, "steady", "ready", Duration::from_secs(5))
        .await;
    let lists_before = c.kube.count(|r| r.method == "GET" && !r.is_watch());

    c.kube.compact();
    // The watcher resumes, gets 410 Gone, and re-lists.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.kube.count(|r| r.method == "GET" && !r.is_watch()) < lists_before + 2 {
        assert!(tokio::time::Instant::now() < deadline, "no re-list after 410");
        assert_eq!(c.activator.get_status("/readyz").await, 200, "a 410 is not an outage");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(c.activator.get_status("/readyz").await, 200);
    assert_eq!(c.activator.vm(NS, "steady").await.unwrap()["state"], "ready");
    assert_eq!(c.activator.send_status("/apps/steady", "after").await, 202);
    assert_eq!(c.kube.count(start_patch("steady")), 1, "no restart");
    assert_eq!(c.kube.guest_events(NS, "steady"), vec!["before", "after"]);
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
        async move { post(&url).await }
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
        async move { post(&url).await }
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

async fn post(url: &str) -> u16 {
    support::post_event(&reqwest::Client::new(), url, "held").await
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
async fn an_api_server_down_at_start_up_is_waited_for() {
    let kube = FakeKube::start(Options::default()).await;
    kube.create_opted_in_vm(NS, "early", annotations("1m"));
    kube.set_down(true).await;
    let (_dir, activator) = spawn_with_kubeconfig(&kube).await;
    assert_eq!(activator.get_status("/readyz").await, 503);
    // Nothing listed yet: the activator cannot tell "unknown" from "not synced", so 503.
    let early = activator.send("/apps/early", "too-early").await;
    assert_eq!(early.status(), 503);
    assert!(early.headers().contains_key("retry-after"));
    assert_eq!(
        early.json::<serde_json::Value>().await.unwrap()["error"],
        "backend_unavailable"
    );

    kube.set_down(false).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    assert_eq!(activator.send_status("/apps/early", "in-time").await, 202);
    assert_eq!(kube.guest_events(NS, "early"), vec!["in-time"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_namespaces_limit_what_the_activator_manages() {
    let kube = FakeKube::start(Options::default()).await;
    kube.create_opted_in_vm(NS, "inside", annotations("1m"));
    kube.create_opted_in_vm("elsewhere", "outside", annotations("1m"));
    let (_dir, activator) = spawn_with_kubevirt_config(&kube, "namespaces: [apps]").await;
    activator.wait_status("/readyz", 200, Duration::from_secs(10)).await;
    activator
        .wait_vm_state(NS, "inside", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(activator.send_status("/elsewhere/outside", "x").await, 404);
    assert_eq!(activator.send_status("/apps/inside", "y").await, 202);
    // Only namespaced requests: a RoleBinding per namespace is enough.
    for r in kube.requests() {
        assert!(r.path.starts_with("/apis/kubevirt.io/v1/namespaces/apps/"), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_larger_than_one_page_is_listed_completely_through_paginated_lists() {
    // 1,200 VMs: three pages of the watcher's 500. Each carries the kind of foreign
    // annotation real clusters have (kubectl's copy of the object), which the activator
    // must ignore.
    let c = cluster(Options::default(), |k| {
        for i in 0..1200 {
            let mut a = annotations("1m");
            a["kubectl.kubernetes.io/last-applied-configuration"] = json!("{\"kind\":\"VirtualMachine\"}");
            k.create_opted_in_vm(NS, &format!("vm-{i:04}"), a);
        }
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while c.activator.vms().await.as_array().map_or(0, Vec::len) < 1200 {
        assert!(tokio::time::Instant::now() < deadline, "not every VM was listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lists: Vec<Recorded> = c
        .kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/virtualmachines") && !r.is_watch())
        .collect();
    assert!(lists.len() >= 3, "expected paginated lists, got {lists:#?}");
    assert!(lists.iter().all(|r| r.query.contains("limit=500")), "{lists:#?}");
    assert!(
        lists.iter().skip(1).any(|r| r.query.contains("continue=")),
        "{lists:#?}"
    );
    // The last VM of the last page works like the first.
    assert_eq!(c.activator.send_status("/apps/vm-1199", "last").await, 202);
    assert_rbac_covers_every_request(&c.kube);
}
