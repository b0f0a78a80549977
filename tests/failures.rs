//! What the sender gets when things go wrong, over real loopback HTTP with the fake
//! backend: full buffers, failed and timed-out starts, VMs that die, guests that stop
//! answering or answer too slowly. Never a 2xx for an event the guest did not accept.

mod support;

use std::time::Duration;

use support::{demo, policy, Harness};
use vm_activator::backend::fake::FakeOptions;
use vm_activator::vm::Policy;

#[tokio::test]
async fn a_full_buffer_answers_503_with_retry_after_and_never_starts_twice() {
    let policy = Policy {
        max_buffered: 2,
        ..policy()
    };
    let h = Harness::start(
        policy,
        FakeOptions {
            boot_delay: Duration::from_millis(800),
            ..Default::default()
        },
    )
    .await;
    let first = tokio::spawn({
        let h_client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { support::post_event(&h_client, &url, "held-1").await }
    });
    let second = tokio::spawn({
        let h_client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { support::post_event(&h_client, &url, "held-2").await }
    });
    h.wait_state("probing", Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = h.send("/default/demo", "refused").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "buffer_full");
    assert_eq!(first.await.unwrap(), 202);
    assert_eq!(second.await.unwrap(), 202);
    assert_eq!(h.backend.starts(&demo()), 1);
    assert!(!h.backend.event_ids(&demo()).contains(&"refused".to_string()));
    assert_eq!(
        h.metric("vm_activator_rejected_total{namespace=\"default\",reason=\"buffer_full\",vm=\"demo\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_failed_start_answers_503_and_the_next_event_tries_again() {
    let h = Harness::start(
        policy(),
        FakeOptions {
            start_error: Some("no capacity".into()),
            ..Default::default()
        },
    )
    .await;
    let refused = h.send("/default/demo", "x").await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "start_failed");
    assert!(body["detail"].as_str().unwrap().contains("no capacity"), "{body}");
    assert_eq!(h.demo_state().await, "failed");
    assert!(h.vms().await[0]["last_error"].as_str().unwrap().contains("no capacity"));

    h.backend.set_options(|o| o.start_error = None);
    assert_eq!(h.send("/default/demo", "y").await.status(), 202);
    assert_eq!(h.backend.event_ids(&demo()), vec!["y"]);
}

#[tokio::test]
async fn a_vm_that_never_becomes_ready_answers_503_at_the_start_timeout_and_is_stopped() {
    let policy = Policy {
        start_timeout: Duration::from_millis(400),
        ..policy()
    };
    let h = Harness::start(
        policy,
        FakeOptions {
            boot_delay: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .await;
    let refused = h.send("/default/demo", "x").await;
    assert_eq!(refused.status(), 503);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "start_timeout");
    // The half-started VM must not keep running unseen.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while h.backend.is_running(&demo()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "VM left running after a failed start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        h.metric("vm_activator_rejected_total{namespace=\"default\",reason=\"start_timeout\",vm=\"demo\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_vm_that_dies_while_events_are_held_answers_them_503_at_once() {
    let h = Harness::start(
        policy(),
        FakeOptions {
            boot_delay: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await;
    let pending = tokio::spawn({
        let client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { support::post_event(&client, &url, "doomed").await }
    });
    h.wait_state("probing", Duration::from_secs(2)).await;
    h.backend.crash(&demo());
    let status = tokio::time::timeout(Duration::from_secs(3), pending)
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(status, 503);
    assert!(h.backend.event_ids(&demo()).is_empty());
}

#[tokio::test]
async fn a_ready_vm_that_exits_on_its_own_is_noticed_and_booted_by_the_next_event() {
    let h = Harness::start(policy(), FakeOptions::default()).await;
    assert_eq!(h.send("/default/demo", "a").await.status(), 202);
    h.backend.crash(&demo());
    h.wait_state("stopped", Duration::from_secs(2)).await;
    assert!(h.vms().await[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("exited on its own"));
    assert_eq!(h.send("/default/demo", "b").await.status(), 202);
    assert_eq!(h.backend.starts(&demo()), 2);
}

#[tokio::test]
async fn a_guest_that_refuses_connections_gets_the_event_once_it_answers_again_within_the_budget() {
    let h = Harness::start(policy(), FakeOptions::default()).await;
    assert_eq!(h.send("/default/demo", "a").await.status(), 202);
    h.backend.kill_guest_app(&demo()).await;
    // Refused: nothing reached the guest, so the event is tried again (within the
    // request timeout, 5 s here) while the endpoint is re-probed.
    let retried = tokio::spawn({
        let client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { support::post_event(&client, &url, "b").await }
    });
    h.wait_state("probing", Duration::from_secs(2)).await;
    let held = tokio::spawn({
        let client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { support::post_event(&client, &url, "c").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!retried.is_finished() && !held.is_finished());
    h.backend.revive_guest_app(&demo()).await;
    assert_eq!(retried.await.unwrap(), 202);
    assert_eq!(held.await.unwrap(), 202);
    assert_eq!(h.demo_state().await, "ready");
    let mut ids = h.backend.event_ids(&demo());
    ids.sort();
    assert_eq!(ids, vec!["a", "b", "c"], "each delivered once");
    assert_eq!(h.backend.starts(&demo()), 1);
    let retries = h
        .metric("vm_activator_guest_connect_retries_total{namespace=\"default\",vm=\"demo\"}")
        .await;
    assert!(retries >= 1.0, "{retries}");
}

#[tokio::test]
async fn a_guest_refusing_past_the_budget_answers_502_and_is_reprobed_before_more_traffic() {
    let policy = Policy {
        request_timeout: Duration::from_millis(300),
        ..policy()
    };
    let h = Harness::start(policy, FakeOptions::default()).await;
    assert_eq!(h.send("/default/demo", "a").await.status(), 202);
    h.backend.kill_guest_app(&demo()).await;
    let failed = h.send("/default/demo", "b").await;
    assert_eq!(failed.status(), 502);
    let body: serde_json::Value = failed.json().await.unwrap();
    assert_eq!(body["error"], "guest_not_connected", "{body}");
    assert_eq!(h.demo_state().await, "probing");
    h.backend.revive_guest_app(&demo()).await;
    assert_eq!(h.send("/default/demo", "c").await.status(), 202);
    assert_eq!(h.backend.event_ids(&demo()), vec!["a", "c"]);
    assert_eq!(h.backend.starts(&demo()), 1);
}

#[tokio::test]
async fn a_slow_guest_answers_504() {
    let policy = Policy {
        request_timeout: Duration::from_millis(200),
        ..policy()
    };
    let h = Harness::start(
        policy,
        FakeOptions {
            response_delay: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    let response = h.send("/default/demo", "slow").await;
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "guest_timeout");
}
