//! A VM's life through the whole activator over real loopback HTTP, with the fake
//! backend whose "VMs" are HTTP servers that start listening after a boot delay: cold
//! start, warm path, bursts, idle scale-down, operator stop/pause, metrics, drain.
//! Failures are in `failures.rs`, request handling in `requests.rs`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use support::{demo, policy, Harness};
use vm_activator::backend::fake::FakeOptions;
use vm_activator::vm::Policy;

const COLD_STARTS: &str = "vm_activator_cold_start_seconds_count{namespace=\"default\",vm=\"demo\"}";

#[tokio::test]
async fn cold_start_holds_the_event_until_the_guest_answers_then_warm_requests_go_straight_through() {
    let h = Harness::start(
        policy(),
        FakeOptions {
            boot_delay: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(h.demo_state().await, "stopped");

    let response = h.send("/default/demo", "first").await;
    assert_eq!(response.status(), 202);
    assert_eq!(h.backend.event_ids(&demo()), vec!["first"]);
    assert_eq!(h.backend.starts(&demo()), 1);

    let response = h.send("/default/demo", "second").await;
    assert_eq!(response.status(), 202);
    assert_eq!(h.backend.event_ids(&demo()), vec!["first", "second"]);
    assert_eq!(h.backend.starts(&demo()), 1, "a warm request starts nothing");
    assert_eq!(h.metric(COLD_STARTS).await, 1.0);

    let vm = &h.vms().await[0];
    assert_eq!(vm["state"], "ready");
    assert!(vm["endpoint"].as_str().unwrap().starts_with("127.2."), "{vm}");
    assert!(vm["last_cold_start_ms"].as_u64().unwrap() >= 300, "{vm}");
    assert!(vm["last_activity"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn a_burst_during_one_cold_start_starts_the_vm_once_and_delivers_every_event_once() {
    let h = Harness::start(
        policy(),
        FakeOptions {
            boot_delay: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .await;
    let ids: Vec<String> = (0..100).map(|i| format!("burst-{i}")).collect();
    let responses = join_all(ids.iter().map(|id| h.send("/default/demo", id))).await;
    for r in &responses {
        assert_eq!(r.status(), 202);
    }
    let delivered = h.backend.event_ids(&demo());
    assert_eq!(delivered.len(), 100);
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    assert_eq!(h.backend.starts(&demo()), 1);
    assert_eq!(h.metric(COLD_STARTS).await, 1.0);
    assert_eq!(
        h.metric("vm_activator_scale_ups_total{namespace=\"default\",vm=\"demo\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn held_events_are_released_in_arrival_order_through_the_concurrency_limit() {
    let policy = Policy {
        concurrency: 1,
        ..policy()
    };
    let h = Harness::start(
        policy,
        FakeOptions {
            boot_delay: Duration::from_millis(400),
            ..Default::default()
        },
    )
    .await;
    let mut sends = Vec::new();
    for i in 0..5 {
        sends.push(tokio::spawn({
            let (client, url) = (h.client.clone(), format!("{}/default/demo", h.ingress));
            async move {
                client
                    .post(url)
                    .header("ce-specversion", "1.0")
                    .header("ce-id", format!("ordered-{i}"))
                    .header("ce-source", "/t")
                    .header("ce-type", "t")
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        }));
        // Let each request reach the gate before the next one is sent.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for s in sends {
        assert_eq!(s.await.unwrap(), 202);
    }
    let expected: Vec<String> = (0..5).map(|i| format!("ordered-{i}")).collect();
    assert_eq!(h.backend.event_ids(&demo()), expected);
}

#[tokio::test]
async fn an_idle_vm_is_stopped_and_the_next_event_boots_it_again() {
    let policy = Policy {
        idle_timeout: Duration::from_millis(300),
        ..policy()
    };
    let h = Harness::start(policy, FakeOptions::default()).await;
    assert_eq!(h.send("/default/demo", "a").await.status(), 202);
    h.wait_state("stopped", Duration::from_secs(5)).await;
    assert_eq!(h.backend.stops(&demo()), 1);
    assert!(!h.backend.is_running(&demo()));
    let text = h.metrics().await;
    assert_eq!(
        support::metric_value(
            &text,
            "vm_activator_scale_downs_total{action=\"stop\",namespace=\"default\",vm=\"demo\"}"
        ),
        1.0
    );

    assert_eq!(h.send("/default/demo", "b").await.status(), 202);
    assert_eq!(h.backend.starts(&demo()), 2);
    assert_eq!(h.metric(COLD_STARTS).await, 2.0);
    assert_eq!(h.backend.event_ids(&demo()), vec!["a", "b"]);
}

#[tokio::test]
async fn an_operator_can_stop_or_pause_an_idle_vm_at_once() {
    let h = Harness::start(policy(), FakeOptions::default()).await;
    let post = |path: &str| h.client.post(format!("{}{path}", h.admin)).send();
    assert_eq!(post("/v1/vms/default/nope/stop").await.unwrap().status(), 404);
    let refused = post("/v1/vms/default/demo/stop").await.unwrap();
    assert_eq!(refused.status(), 409);
    assert_eq!(
        refused.json::<serde_json::Value>().await.unwrap()["error"],
        "not_applicable"
    );

    assert_eq!(h.send("/default/demo", "a").await.status(), 202);
    let accepted = post("/v1/vms/default/demo/stop").await.unwrap();
    assert_eq!(accepted.status(), 202);
    assert_eq!(accepted.json::<serde_json::Value>().await.unwrap()["name"], "demo");
    h.wait_state("stopped", Duration::from_secs(5)).await;
    assert_eq!(h.backend.stops(&demo()), 1);
    assert_eq!(
        h.metric("vm_activator_scale_downs_total{action=\"stop\",namespace=\"default\",vm=\"demo\"}")
            .await,
        1.0
    );
    // The fake backend cannot pause: a pause request stops instead, as the idle timer would.
    assert_eq!(h.send("/default/demo", "b").await.status(), 202);
    assert_eq!(post("/v1/vms/default/demo/pause").await.unwrap().status(), 202);
    h.wait_state("stopped", Duration::from_secs(5)).await;
    assert_eq!(h.backend.stops(&demo()), 2);
    assert_eq!(h.backend.event_ids(&demo()), vec!["a", "b"]);
}

#[tokio::test]
async fn metrics_expose_every_contract_name() {
    let h = Harness::start(policy(), FakeOptions::default()).await;
    assert_eq!(h.send("/default/demo", "m").await.status(), 202);
    let text = h.metrics().await;
    for name in [
        "vm_activator_requests_total",
        "vm_activator_request_duration_seconds",
        "vm_activator_cold_start_seconds",
        "vm_activator_cold_start_phase_seconds",
        "vm_activator_buffered_requests",
        "vm_activator_in_flight_requests",
        "vm_activator_scale_ups_total",
        "vm_activator_scale_downs_total",
        "vm_activator_rejected_total",
        "vm_activator_vm_state",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    for phase in ["start_call", "boot", "probe"] {
        let series = format!(
            "vm_activator_cold_start_phase_seconds_count{{namespace=\"default\",phase=\"{phase}\",vm=\"demo\"}}"
        );
        assert_eq!(support::metric_value(&text, &series), 1.0, "{series}");
    }
    assert_eq!(
        support::metric_value(
            &text,
            "vm_activator_vm_state{namespace=\"default\",state=\"ready\",vm=\"demo\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn drain_finishes_held_events_refuses_new_ones_and_fails_readyz() {
    let h = Harness::start(
        policy(),
        FakeOptions {
            boot_delay: Duration::from_millis(600),
            ..Default::default()
        },
    )
    .await;
    let held = tokio::spawn({
        let client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { support::post_event(&client, &url, "held").await }
    });
    h.wait_state("probing", Duration::from_secs(2)).await;
    let activator = h.server.activator.clone();
    let (client, ingress, admin) = (h.client.clone(), h.ingress.clone(), h.admin.clone());
    let drain = tokio::spawn(h.server.drain());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(activator.is_draining());
    let ready = client.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let refused = support::post_event(&client, &format!("{ingress}/default/demo"), "late").await;
    assert_eq!(refused, 503);
    assert_eq!(held.await.unwrap(), 202, "held events are delivered during the drain");
    assert!(drain.await.unwrap(), "drain completed within its timeout");
    assert_eq!(h.backend.event_ids(&demo()), vec!["held"]);
}

/// A CloudEvent of the pre-warm type starts the VM and is answered 202 once the start is
/// issued — nothing reaches the guest; the next event finds the VM warm. An operator's
/// `POST …/start` does the same (here behind a bearer token file).
#[tokio::test]
async fn a_prewarm_event_or_the_admin_start_verb_starts_the_vm_and_delivers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(&tokens, "# operators\nop-secret\n").unwrap();
    let mut config = vm_activator::config::Config::for_tests();
    config.admin.verbs_auth = Some(vm_activator::config::VerbAuthMode::Bearer);
    config.admin.bearer_tokens_file = Some(tokens);
    let h = Harness::start_with(vec![(demo(), policy())], FakeOptions::default(), config).await;

    let prewarm = h
        .client
        .post(format!("{}/default/demo", h.ingress))
        .header("ce-specversion", "1.0")
        .header("ce-id", "warm-up-1")
        .header("ce-source", "/ci/queue")
        .header("ce-type", "io.vm-activator.prewarm")
        .send()
        .await
        .unwrap();
    assert_eq!(prewarm.status(), 202);
    let body: serde_json::Value = prewarm.json().await.unwrap();
    assert_eq!(body["prewarm"], true);
    assert_eq!(body["state"], "starting");
    h.wait_state("ready", Duration::from_secs(5)).await;
    assert_eq!(h.backend.starts(&demo()), 1);
    assert!(h.backend.event_ids(&demo()).is_empty(), "a pre-warm is not delivered");
    assert_eq!(h.send("/default/demo", "real").await.status(), 202);
    assert_eq!(h.backend.event_ids(&demo()), vec!["real"]);
    assert_eq!(h.backend.starts(&demo()), 1, "the event found it warm");

    // The admin verbs need the operator's token; with it, stop and start again.
    let admin = |verb: &str, token: Option<&str>| {
        let mut request = h.client.post(format!("{}/v1/vms/default/demo/{verb}", h.admin));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(admin("stop", None).await.unwrap().status(), 401);
    assert_eq!(admin("stop", Some("guess")).await.unwrap().status(), 401);
    assert_eq!(h.demo_state().await, "ready", "nothing moved");
    assert_eq!(admin("stop", Some("op-secret")).await.unwrap().status(), 202);
    h.wait_state("stopped", Duration::from_secs(5)).await;
    assert_eq!(admin("start", None).await.unwrap().status(), 401);
    assert_eq!(h.demo_state().await, "stopped", "nothing moved");
    let started = admin("start", Some("op-secret")).await.unwrap();
    assert_eq!(started.status(), 202);
    assert_eq!(started.json::<serde_json::Value>().await.unwrap()["name"], "demo");
    h.wait_state("ready", Duration::from_secs(5)).await;
    assert_eq!(h.backend.starts(&demo()), 2);
    assert_eq!(
        admin("start", Some("op-secret")).await.unwrap().status(),
        202,
        "already up: fine"
    );
    assert_eq!(h.backend.starts(&demo()), 2);
    assert_eq!(admin("start", Some("op-secret")).await.unwrap().status(), 202);
    let unknown = h
        .client
        .post(format!("{}/v1/vms/default/nope/start", h.admin))
        .bearer_auth("op-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}
