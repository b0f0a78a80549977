//! Behaviour of the whole activator over real loopback HTTP, with the fake backend
//! whose "VMs" are HTTP servers that start listening after a boot delay.

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
        async move { send_with(&h_client, &url, "held-1").await }
    });
    let second = tokio::spawn({
        let h_client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { send_with(&h_client, &url, "held-2").await }
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

async fn send_with(client: &reqwest::Client, url: &str, id: &str) -> u16 {
    support::post_event(client, url, id).await
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
        async move { send_with(&client, &url, "doomed").await }
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
async fn a_guest_that_stops_answering_gets_502_and_is_reprobed_before_more_traffic() {
    let h = Harness::start(policy(), FakeOptions::default()).await;
    assert_eq!(h.send("/default/demo", "a").await.status(), 202);
    h.backend.kill_guest_app(&demo());
    let failed = h.send("/default/demo", "b").await;
    assert_eq!(failed.status(), 502);
    assert_eq!(h.demo_state().await, "probing");
    // Held, not refused, while the guest is probed; delivered once it answers again.
    let held = tokio::spawn({
        let client = h.client.clone();
        let url = format!("{}/default/demo", h.ingress);
        async move { send_with(&client, &url, "c").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!held.is_finished());
    h.backend.revive_guest_app(&demo()).await;
    assert_eq!(held.await.unwrap(), 202);
    assert_eq!(h.demo_state().await, "ready");
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

#[tokio::test]
async fn the_guest_status_headers_and_path_pass_through() {
    let policy = Policy {
        path: "/api".into(),
        ..policy()
    };
    let h = Harness::start(
        policy,
        FakeOptions {
            response_status: 201,
            ..Default::default()
        },
    )
    .await;
    let response = h
        .client
        .post(format!("{}/default/demo/orders/42?priority=high", h.ingress))
        .header("ce-specversion", "1.0")
        .header("ce-id", "o-42")
        .header("ce-source", "/shop")
        .header("ce-type", "order.created")
        .header("ce-subject", "caf%C3%A9")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .header("content-type", "application/json")
        .body("{\"total\": 3}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let log = h.backend.guest_log(&demo());
    let log = log.lock().unwrap();
    assert_eq!(log.paths, vec!["/api/orders/42"]);
    assert_eq!(&log.last_body[..], b"{\"total\": 3}");
    let header = |name: &str| {
        log.last_headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        header("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(
        header("ce-subject"),
        Some("caf%C3%A9"),
        "ce- values are forwarded untouched"
    );
    assert_eq!(header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_start_nothing() {
    let h = Harness::start(policy(), FakeOptions::default()).await;
    let post = |path: &str| h.client.post(format!("{}{path}", h.ingress));

    let missing_id = post("/default/demo")
        .header("ce-specversion", "1.0")
        .header("ce-source", "/t")
        .header("ce-type", "t")
        .send()
        .await
        .unwrap();
    assert_eq!(missing_id.status(), 400);
    let body: serde_json::Value = missing_id.json().await.unwrap();
    assert_eq!(body["error"], "invalid_event");
    assert_eq!(body["attribute"], "id");
    assert!(body["detail"].as_str().unwrap().contains("\"id\""), "{body}");

    let unknown = h.send("/default/nope", "x").await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<serde_json::Value>().await.unwrap()["error"],
        "unknown_vm"
    );

    let no_route = h.client.get(format!("{}/", h.ingress)).send().await.unwrap();
    assert_eq!(no_route.status(), 404);

    let wrong_method = h
        .client
        .get(format!("{}/default/demo", h.ingress))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);

    let too_big = post("/default/demo")
        .header("ce-specversion", "1.0")
        .header("ce-id", "big")
        .header("ce-source", "/t")
        .header("ce-type", "t")
        .body(vec![b'x'; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);

    for path in [
        "/default/demo/%2e%2e/admin",
        "/default/demo/../admin",
        "/default/demo/..%2Fadmin",
    ] {
        let request = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        assert_eq!(
            support::raw_status(h.server.ingress_addr, &request).await,
            400,
            "{path}"
        );
    }

    assert_eq!(h.backend.starts(&demo()), 0, "no bad request may start the VM");
    let text = h.metrics().await;
    assert_eq!(
        support::metric_value(
            &text,
            "vm_activator_rejected_total{namespace=\"default\",reason=\"invalid_event\",vm=\"demo\"}"
        ),
        1.0,
        "only the missing id is counted per VM; bad paths are refused before any VM is known"
    );
    assert_eq!(
        support::metric_value(
            &text,
            "vm_activator_rejected_total{namespace=\"default\",reason=\"body_too_large\",vm=\"demo\"}"
        ),
        1.0
    );
    assert!(h.healthy().await, "the process stays healthy");
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
        async move { send_with(&client, &url, "held").await }
    });
    h.wait_state("probing", Duration::from_secs(2)).await;
    let activator = h.server.activator.clone();
    let (client, ingress, admin) = (h.client.clone(), h.ingress.clone(), h.admin.clone());
    let drain = tokio::spawn(h.server.drain());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(activator.is_draining());
    let ready = client.get(format!("{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let refused = send_with(&client, &format!("{ingress}/default/demo"), "late").await;
    assert_eq!(refused, 503);
    assert_eq!(held.await.unwrap(), 202, "held events are delivered during the drain");
    assert!(drain.await.unwrap(), "drain completed within its timeout");
    assert_eq!(h.backend.event_ids(&demo()), vec!["held"]);
}

#[tokio::test]
async fn oversize_and_slow_request_heads_are_cut_off_and_the_process_stays_healthy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = vm_activator::config::Config::for_tests();
    config.ingress.header_read_timeout = Duration::from_millis(300);
    config.ingress.max_header_bytes = 16 * 1024;
    let h = Harness::start_with(vec![(demo(), policy())], FakeOptions::default(), config).await;
    let addr = h.server.ingress_addr;

    // A head larger than max_header_bytes: 431, before any body is read.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /default/demo HTTP/1.1\r\nhost: x\r\nce-specversion: 1.0\r\nx-padding: {}\r\ncontent-length: 0\r\n\r\n",
        "x".repeat(64 * 1024)
    );
    let _ = stream.write_all(head.as_bytes()).await; // the server may stop reading early
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered promptly")
        .unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );

    // Slowloris: a head that never ends is dropped after header_read_timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /default/demo HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut answer))
        .await
        .expect("the connection is closed, not left open")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    assert_eq!(h.backend.starts(&demo()), 0);
    assert!(h.healthy().await, "the process stays healthy");
    assert_eq!(h.send("/default/demo", "after").await.status(), 202, "still serving");
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
