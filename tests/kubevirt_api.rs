//! The KubeVirt backend when the API server is in trouble or large: outages at start-up
//! and while running, expired watches, namespace scoping (fake only: the real API server
//! cannot be taken down or compacted under one test), and paginated lists (on both, as
//! in `kubevirt.rs`; every real-server scenario runs namespace-scoped under a
//! RoleBinding), and the catalog while the watches sync concurrently.

mod support;

use std::time::Duration;

use fake_kube::{FakeKube, Options, Recorded};
use futures_util::StreamExt;

on_fake_and_real!(a_catalog_larger_than_one_page_is_listed_completely_through_paginated_lists);
use serde_json::json;
use support::binary::Activator;
use support::kube::*;
use support::real_kube::own::OwnCluster;

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

/// As a kube-apiserver shutting down gracefully (a control-plane rolling upgrade): it
/// refuses new connections but keeps the open watches open, so the watches alone would
/// never tell. The first write that cannot connect marks the backend degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_refusing_new_connections_is_noticed_at_the_first_failed_write() {
    let c = cluster(Options::default(), |k| {
        k.create_opted_in_vm(NS, "svc", annotations("1m"));
        k.create_opted_in_vm(NS, "other", annotations("1m"));
    })
    .await;
    for vm in ["svc", "other"] {
        c.activator
            .wait_vm_state(NS, vm, "stopped", Duration::from_secs(5))
            .await;
    }
    c.kube.refuse_new_connections(true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.activator.get_status("/readyz").await,
        200,
        "the watches are still open"
    );

    // The start call cannot connect: the held event is answered 503 at once.
    let failed = tokio::time::timeout(Duration::from_secs(10), c.activator.send("/apps/svc", "e-1"))
        .await
        .expect("never a hang");
    assert_eq!(failed.status(), 503);
    assert!(failed.headers().contains_key("retry-after"));
    c.activator.wait_status("/readyz", 503, Duration::from_secs(2)).await;
    // Degraded: a VM that is not Ready is not even tried.
    let refused = c.activator.send("/apps/other", "e-2").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.json::<serde_json::Value>().await.unwrap()["error"],
        "backend_unavailable"
    );
    assert_eq!(
        c.activator
            .metric("vm_activator_rejected_total{namespace=\"apps\",reason=\"backend_unavailable\",vm=\"other\"}")
            .await,
        1.0
    );

    // Back: a round trip a second finds it, and events start VMs again.
    c.kube.refuse_new_connections(false).await;
    c.activator.wait_status("/readyz", 200, Duration::from_secs(5)).await;
    assert_eq!(c.activator.send_status("/apps/svc", "after").await, 202);
    assert_eq!(c.kube.guest_events(NS, "svc"), vec!["after"]);
}

/// The same against a real kube-apiserver sent SIGTERM (a cluster of this test's own:
/// the one the other scenarios share must stay up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_api_server_sent_sigterm_is_noticed_at_the_first_failed_write() {
    let Some(cluster) = OwnCluster::start("k8s-sigterm", 16543).await else {
        return;
    };
    cluster.create_opted_in_vm("svc", annotations("1m")).await;
    let activator = Activator::spawn_kubevirt(&cluster.kubeconfig, &[]).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(30)).await;
    activator
        .wait_vm_state("default", "svc", "stopped", Duration::from_secs(10))
        .await;

    cluster.sigterm_apiserver();
    let failed = tokio::time::timeout(Duration::from_secs(30), activator.send("/default/svc", "e-1"))
        .await
        .expect("never a hang");
    eprintln!("event after SIGTERM: {} {:?}", failed.status(), failed.text().await);
    activator.wait_status("/readyz", 503, Duration::from_secs(2)).await;

    // A new API server (up.sh starts what is not running): ready again.
    cluster.up().await;
    activator.wait_status("/readyz", 200, Duration::from_secs(60)).await;
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
    assert_eq!(c.kube.count(start_patch(NS, "steady")), 1, "no restart");
    assert_eq!(c.kube.guest_events(NS, "steady"), vec!["before", "after"]);
}

/// The flake of `api_calls_per_cold_start_and_scale_down_for_each_kind` (tests/workloads.rs)
/// on a loaded machine, made deterministic: the watches pass every change on 3 s late,
/// longer than the VM's idle timeout, so when the idle stop comes the store has not yet
/// seen the activator's own activity record. The stop used to compare against the
/// store's (stale) view, find nothing, write the record again and give up until the next
/// idle check — two extra writes and a later stop. It now compares against the newer of
/// the store's record and its own: one record written, one compare-and-stop, applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_lagging_behind_its_own_activity_record_stops_at_the_first_compare() {
    let options = Options {
        watch_delay: Duration::from_secs(3),
        ..Options::default()
    };
    let c = cluster(options, |k| k.create_opted_in_vm(NS, "svc", annotations("2s"))).await;
    c.activator
        .wait_vm_state(NS, "svc", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(c.activator.send_status("/apps/svc", "one").await, 202);
    let stop = c
        .kube
        .expect_request("the compare-and-stop", Duration::from_secs(20), stop_patch(NS, "svc"))
        .await;
    assert_eq!(stop.status, 200, "applied at the first compare: {stop:?}");
    let requests = c.kube.requests();
    let writes: Vec<String> = requests
        .iter()
        .filter(|r| r.is_vm_patch(NS, "svc"))
        .map(|r| format!("{} {}", r.summary(), r.status))
        .collect();
    assert_eq!(
        writes,
        [
            "PATCH virtualmachines/svc (merge patch) 200", // start
            "PATCH virtualmachines/svc (merge patch) 200", // the activity record
            "PATCH virtualmachines/svc (JSON patch) 200",  // compare-and-stop
        ],
        "one record, one compare"
    );
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
        let namespaced = [
            "/apis/kubevirt.io/v1/namespaces/apps/",
            "/apis/apps/v1/namespaces/apps/",
            "/api/v1/namespaces/apps/",
            // The Events on the VMs it manages.
            "/apis/events.k8s.io/v1/namespaces/apps/",
        ];
        assert!(namespaced.iter().any(|prefix| r.path.starts_with(prefix)), "{r:?}");
    }
}

async fn a_catalog_larger_than_one_page_is_listed_completely_through_paginated_lists(kube: impl Kube) {
    // 1,200 VMs: three pages of the watcher's 500. Each carries the kind of foreign
    // annotation real clusters have (kubectl's copy of the object), which the activator
    // must ignore.
    futures_util::stream::iter(0..1200)
        .for_each_concurrent(16, |i| {
            let mut a = annotations("1m");
            a["kubectl.kubernetes.io/last-applied-configuration"] = json!("{\"kind\":\"VirtualMachine\"}");
            let kube = &kube;
            async move { kube.create_opted_in_vm(&format!("vm-{i:04}"), a).await }
        })
        .await;
    let activator = kube.spawn_activator(&[]).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(30)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while activator.vms().await.as_array().map_or(0, Vec::len) < 1200 {
        assert!(tokio::time::Instant::now() < deadline, "not every VM was listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lists: Vec<Recorded> = kube
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
    assert_eq!(activator.send_status(&kube.path("vm-1199"), "last").await, 202);
    assert_rbac_covers_every_request(kube.requests());
}

/// The admin verbs on KubeVirt are authorized by the API server: no token or an unknown
/// one is 401, a user without the permission `virtctl start` needs is 403 — and nothing
/// moves either way; with the grant the VM starts. Each review asks exactly that
/// permission of exactly that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_verbs_are_authorized_by_the_api_server() {
    let c = cluster(Options::default(), |k| {
        k.create_opted_in_vm(NS, "svc", annotations("1m"));
        k.add_token("alice-token", "alice");
    })
    .await;
    c.activator
        .wait_vm_state(NS, "svc", "stopped", Duration::from_secs(5))
        .await;
    let client = reqwest::Client::new();
    let verb = |verb: &str, token: Option<&str>| {
        let mut request = client.post(format!("{}/v1/vms/{NS}/svc/{verb}", c.activator.admin));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let vm_patches = || c.kube.count(|r| r.is_vm_patch(NS, "svc"));

    let anonymous = verb("start", None).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    assert_eq!(verb("start", Some("stolen")).await.unwrap().status(), 401);
    let forbidden = verb("start", Some("alice-token")).await.unwrap();
    assert_eq!(forbidden.status(), 403);
    let body: serde_json::Value = forbidden.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert!(
        body["detail"].as_str().unwrap().contains("virtualmachines/start"),
        "{body}"
    );
    assert_eq!(vm_patches(), 0, "nothing moved");
    assert_eq!(c.activator.vm(NS, "svc").await.unwrap()["state"], "stopped");

    let review = c
        .kube
        .expect_request("the access review", Duration::from_secs(1), |r| {
            r.path == "/apis/authorization.k8s.io/v1/subjectaccessreviews"
        })
        .await;
    let asked: serde_json::Value = serde_json::from_str(&review.body).unwrap();
    assert_eq!(asked["spec"]["user"], "alice");
    assert_eq!(
        asked["spec"]["resourceAttributes"],
        serde_json::json!({
            "namespace": NS, "verb": "update", "group": "subresources.kubevirt.io",
            "resource": "virtualmachines", "subresource": "start", "name": "svc",
        })
    );

    c.kube
        .grant("alice", NS, "subresources.kubevirt.io", "virtualmachines", "start");
    let started = verb("start", Some("alice-token")).await.unwrap();
    assert_eq!(started.status(), 202);
    c.activator
        .wait_vm_state(NS, "svc", "ready", Duration::from_secs(10))
        .await;
    assert!(vm_patches() >= 1);
    // Starting is not stopping.
    assert_eq!(verb("stop", Some("alice-token")).await.unwrap().status(), 403);
    assert_eq!(c.activator.vm(NS, "svc").await.unwrap()["state"], "ready");
    assert_rbac_covers_every_request(c.kube.requests());
}

/// What `kubectl describe vm` shows: a Warning for a bad annotation, then for one cold
/// start and its scale-down a `ScaledUp` naming the CloudEvent, a `Ready` with the cold
/// start's phases and a `ScaledDown` — each on the VirtualMachine (by uid), reported by
/// `vm-activator` and its instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_events_tell_the_story_of_a_cold_start() {
    let c = cluster(Options::default(), |k| {
        let mut settings = annotations("1s");
        settings["vm-activator.io/max-buffered"] = json!("lots");
        k.create_opted_in_vm(NS, "svc", settings);
    })
    .await;
    c.activator
        .wait_vm_state(NS, "svc", "stopped", Duration::from_secs(5))
        .await;
    assert_eq!(c.activator.send_status("/apps/svc", "order-42").await, 202);
    c.activator
        .wait_vm_state(NS, "svc", "stopped", Duration::from_secs(15))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let events = loop {
        let events = c.kube.k8s_events(NS);
        if events.len() >= 4 || tokio::time::Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reasons: Vec<&str> = events.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        ["BadAnnotation", "ScaledUp", "Ready", "ScaledDown"],
        "{events:#?}"
    );
    let vm = c.kube.vm(NS, "svc").unwrap();
    for event in &events {
        assert_eq!(event["regarding"]["kind"], "VirtualMachine");
        assert_eq!(event["regarding"]["name"], "svc");
        assert_eq!(event["regarding"]["uid"], vm["metadata"]["uid"]);
        assert_eq!(event["reportingController"], "vm-activator");
        assert!(event["reportingInstance"].as_str().is_some_and(|i| !i.is_empty()));
    }
    let note = |i: usize| events[i]["note"].as_str().unwrap().to_string();
    assert_eq!(events[0]["type"], "Warning");
    assert!(note(0).contains("max-buffered"), "{}", note(0));
    assert!(
        note(1).contains("id=order-42 source=/e2e") && note(1).contains("1 event(s) held"),
        "{}",
        note(1)
    );
    assert!(
        note(2).contains("cold start") && note(2).contains("start call") && note(2).contains("probe"),
        "{}",
        note(2)
    );
    assert_eq!(events[3]["action"], "Stop");
    assert!(note(3).starts_with("stop after"), "{}", note(3));
    assert_rbac_covers_every_request(c.kube.requests());
}

/// Each watch rebuilds the catalog from every store when it syncs, from its own task.
/// However those rebuilds interleave, the catalog that stays lists every opted-in object
/// of every kind. A rebuild computed before another watch synced and published after
/// that watch's own rebuild used to leave the newer kind out until one of its objects
/// changed (seen in CI as a Deployment never listed). Backends started in a loop
/// in-process, with spinning threads taking the CPU from the watch tasks mid-rebuild as
/// CI's parallel tests do: without the fix this failed in 3 of 4 runs here (at rounds
/// 12, 17 and 52).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_keeps_every_kind_however_the_watches_syncs_interleave() {
    use fake_kube::{Res, WorkloadSpec};
    use vm_activator::backend::kubevirt::KubevirtBackend;
    use vm_activator::backend::Backend;
    use vm_activator::config::KubevirtConfig;

    const EACH: usize = 150;
    let kube = FakeKube::start(Options::default()).await;
    for i in 0..EACH {
        kube.create_opted_in_vm(NS, &format!("vm-{i}"), annotations("1m"));
        kube.create_workload(&WorkloadSpec::opted_in(Res::Deployment, NS, &format!("deploy-{i}")));
        kube.create_workload(&WorkloadSpec::opted_in(Res::StatefulSet, NS, &format!("sts-{i}")));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = KubevirtConfig {
        kubeconfig: Some(kube.write_kubeconfig(dir.path())),
        ..KubevirtConfig::default()
    };
    let _busy = BusyCpus::start(4);
    for round in 0..60 {
        let backend = KubevirtBackend::connect(config.clone()).await.expect("backend");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let listed = backend.catalog().borrow().len();
            if backend.is_connected() && listed == 3 * EACH {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: {listed} of {} objects listed after every watch synced",
                3 * EACH
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        backend.shutdown().await;
    }
}

/// Threads that spin until dropped: they take the CPU from other threads at any point.
struct BusyCpus(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl BusyCpus {
    fn start(threads: usize) -> BusyCpus {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for _ in 0..threads {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        BusyCpus(stop)
    }
}

impl Drop for BusyCpus {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
