//! Request handling over real loopback HTTP with the fake backend: what passes through
//! to the guest untouched, and what is refused before any VM is started.

mod support;

use std::time::Duration;

use support::{demo, policy, Harness};
use vm_activator::backend::fake::FakeOptions;
use vm_activator::vm::Policy;

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
