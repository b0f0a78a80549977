//! The ingress router called directly (`oneshot`, no sockets) — built by `server::app`,
//! with every layer the binary has: a table of bad inputs, each checked for status,
//! error code, the attribute named, `Retry-After` where due, and that no VM was started.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;
use vm_activator::backend::fake::{FakeBackend, FakeOptions};
use vm_activator::config::Config;
use vm_activator::server;
use vm_activator::vm::{Policy, VmKey};

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static str,
    status: u16,
    error: &'static str,
    attribute: Option<&'static str>,
}

fn binary_headers_without(skip: &str) -> Vec<(&'static str, &'static str)> {
    [
        ("ce-specversion", "1.0"),
        ("ce-id", "e-1"),
        ("ce-source", "/s"),
        ("ce-type", "t"),
    ]
    .into_iter()
    .filter(|(k, _)| *k != skip)
    .collect()
}

fn with(
    mut base: Vec<(&'static str, &'static str)>,
    extra: (&'static str, &'static str),
) -> Vec<(&'static str, &'static str)> {
    base.retain(|(k, _)| *k != extra.0);
    base.push(extra);
    base
}

const STRUCTURED: (&str, &str) = ("content-type", "application/cloudevents+json");
/// 300 bytes: over the 256-byte limit these tests configure.
const OVERSIZE: &str = concat!(
    "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789",
    "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789",
    "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789"
);
const BATCH: (&str, &str) = ("content-type", "application/cloudevents-batch+json");

fn cases() -> Vec<Case> {
    let bad = |name, headers, body, attribute| Case {
        name,
        method: "POST",
        path: "/default/demo",
        headers,
        body,
        status: 400,
        error: "invalid_event",
        attribute,
    };
    vec![
        bad("missing id", binary_headers_without("ce-id"), "", Some("id")),
        bad(
            "missing source",
            binary_headers_without("ce-source"),
            "",
            Some("source"),
        ),
        bad("missing type", binary_headers_without("ce-type"), "", Some("type")),
        bad(
            "missing specversion (not an event)",
            binary_headers_without("ce-specversion"),
            "",
            Some("specversion"),
        ),
        bad(
            "empty id",
            with(binary_headers_without(""), ("ce-id", "")),
            "",
            Some("id"),
        ),
        bad(
            "empty source",
            with(binary_headers_without(""), ("ce-source", "")),
            "",
            Some("source"),
        ),
        bad(
            "empty type",
            with(binary_headers_without(""), ("ce-type", "")),
            "",
            Some("type"),
        ),
        bad(
            "specversion 0.3",
            with(binary_headers_without(""), ("ce-specversion", "0.3")),
            "",
            Some("specversion"),
        ),
        bad(
            "specversion 2.0",
            with(binary_headers_without(""), ("ce-specversion", "2.0")),
            "",
            Some("specversion"),
        ),
        bad(
            "bad percent-encoding",
            with(binary_headers_without(""), ("ce-subject", "%G1")),
            "",
            Some("subject"),
        ),
        bad("structured invalid JSON", vec![STRUCTURED], "{\"specversion\": ", None),
        bad(
            "structured data and data_base64",
            vec![STRUCTURED],
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
            Some("data_base64"),
        ),
        bad(
            "structured missing id",
            vec![STRUCTURED],
            r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
            Some("id"),
        ),
        bad(
            "batch with one bad event",
            vec![BATCH],
            r#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},{"specversion":"1.0","id":"","source":"/s","type":"t"}]"#,
            Some("id"),
        ),
        bad(
            "structured invalid UTF-8",
            vec![STRUCTURED],
            "{\"specversion\":\"1.0\",\"id\":\"\u{fffd}",
            None,
        ),
        Case {
            name: "unknown VM",
            method: "POST",
            path: "/default/other",
            headers: binary_headers_without(""),
            body: "",
            status: 404,
            error: "unknown_vm",
            attribute: None,
        },
        Case {
            name: "no route",
            method: "POST",
            path: "/only-one-segment",
            headers: vec![],
            body: "",
            status: 404,
            error: "no_route",
            attribute: None,
        },
        Case {
            name: "wrong method",
            method: "PUT",
            path: "/default/demo",
            headers: binary_headers_without(""),
            body: "",
            status: 405,
            error: "method_not_allowed",
            attribute: None,
        },
        Case {
            name: "path traversal",
            method: "POST",
            path: "/default/demo/a/../../x",
            headers: binary_headers_without(""),
            body: "",
            status: 400,
            error: "bad_path",
            attribute: None,
        },
        Case {
            name: "body over the limit",
            method: "POST",
            path: "/default/demo",
            headers: binary_headers_without(""),
            body: OVERSIZE,
            status: 413,
            error: "body_too_large",
            attribute: None,
        },
    ]
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_a_json_error_naming_the_cause() {
    let key = VmKey::new("default", "demo");
    let backend = FakeBackend::new([(key.clone(), Policy::default())], FakeOptions::default());
    let mut config = Config::for_tests();
    config.ingress.max_body_bytes = 256;
    let app = server::app(&config, backend.clone()).await.unwrap().ingress;

    for case in cases() {
        let mut request = Request::builder().method(case.method).uri(case.path);
        for (k, v) in &case.headers {
            request = request.header(*k, *v);
        }
        let body = if case.name.contains("UTF-8") {
            // Bytes that are not UTF-8 at all.
            let mut bytes = b"{\"specversion\":\"1.0\",\"id\":\"".to_vec();
            bytes.extend_from_slice(&[0xff, 0xfe, b'"', b'}']);
            Body::from(bytes)
        } else {
            Body::from(case.body)
        };
        let response = app.clone().oneshot(request.body(body).unwrap()).await.unwrap();
        assert_eq!(response.status().as_u16(), case.status, "{}", case.name);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(content_type, "application/json", "{}", case.name);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["error"], case.error, "{}: {json}", case.name);
        assert!(!json["detail"].as_str().unwrap().is_empty(), "{}", case.name);
        if let Some(attribute) = case.attribute {
            assert_eq!(json["attribute"], attribute, "{}: {json}", case.name);
            assert!(
                json["detail"].as_str().unwrap().contains(attribute),
                "{}: {json}",
                case.name
            );
        }
    }
    assert_eq!(backend.starts(&key), 0, "no bad input may start a VM");
}

/// A minimal structured-mode CloudEvent with `id`, posted to `path`.
fn structured_event(path: &str, id: &str) -> Request<Body> {
    let event = format!(r#"{{"specversion":"1.0","id":"{id}","source":"/s","type":"t"}}"#);
    Request::post(path)
        .header(STRUCTURED.0, STRUCTURED.1)
        .body(Body::from(event))
        .unwrap()
}

#[tokio::test]
async fn a_valid_event_through_oneshot_is_delivered() {
    let key = VmKey::new("default", "demo");
    let policy = Policy {
        start_timeout: Duration::from_secs(5),
        ..Policy::default()
    };
    let backend = FakeBackend::new([(key.clone(), policy)], FakeOptions::default());
    let app = server::app(&Config::for_tests(), backend.clone())
        .await
        .unwrap()
        .ingress;
    let response = app.oneshot(structured_event("/default/demo", "s-1")).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(backend.event_ids(&key), vec!["s-1"]);
}

/// A VM the backend lists before the catalog sync registered it (the sync is a task of
/// its own, a step behind; `server::app` runs none, which holds that window open): its
/// event is delivered, not refused. A soak run once caught a replica in that window —
/// `/readyz` 200, the first event 503 `backend_unavailable`.
#[tokio::test]
async fn an_event_for_a_vm_listed_but_not_yet_registered_is_delivered() {
    let backend = FakeBackend::new([], FakeOptions::default());
    let app = server::app(&Config::for_tests(), backend.clone())
        .await
        .unwrap()
        .ingress;
    let key = VmKey::new("default", "new");
    backend.add_vm(key.clone(), Policy::default());
    let response = app.oneshot(structured_event("/default/new", "n-1")).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(backend.event_ids(&key), vec!["n-1"]);
}
