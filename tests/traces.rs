//! OpenTelemetry traces end to end: the real binary (KubeVirt backend, fake API server)
//! exporting over OTLP — gRPC, then HTTP/protobuf — to a receiver in this process (the
//! `opentelemetry-proto` service types behind tonic, and a plain HTTP handler). A cold
//! and a warm event, each sent with a `traceparent`, must come back as the documented
//! span tree (`src/telemetry/event.rs`), the guest must get the activator's span as its
//! parent, and the log lines of a traced request must carry its trace id.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_kube::{FakeKube, Options};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, Span};
use prost::Message;
use support::binary::Activator;
use support::kube::annotations;
use tokio::time::Instant;

const NS: &str = "traced";
const VM: &str = "orders";
/// The trace of the event that is refused.
const REFUSED_TRACE: &str = "5b8efff798038103d269b633813fc60c";

/// What the receiver got: every export request's resource spans.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<ResourceSpans>>>);

impl Received {
    fn spans(&self) -> Vec<Span> {
        let received = self.0.lock().unwrap();
        received
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.iter().cloned())
            .collect()
    }

    fn service_names(&self) -> BTreeSet<String> {
        let received = self.0.lock().unwrap();
        received
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .flat_map(|r| &r.attributes)
            .filter(|kv| kv.key == "service.name")
            .filter_map(|kv| string(kv.value.as_ref()?.value.as_ref()?))
            .collect()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().extend(request.into_inner().resource_spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver on a free loopback port: its endpoint and what it got.
async fn grpc_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (endpoint, received)
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf bodies) on a free loopback port.
async fn http_receiver() -> (String, Received) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
                kept.0.lock().unwrap().extend(request.resource_spans);
                let answer = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
                ([("content-type", "application/x-protobuf")], answer)
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (endpoint, received)
}

#[tokio::test]
async fn a_cold_and_a_warm_event_are_traced_over_otlp_grpc() {
    let (endpoint, received) = grpc_receiver().await;
    cold_and_warm_event_traces("grpc", &endpoint, received).await;
}

#[tokio::test]
async fn a_cold_and_a_warm_event_are_traced_over_otlp_http_protobuf() {
    let (endpoint, received) = http_receiver().await;
    cold_and_warm_event_traces("http/protobuf", &endpoint, received).await;
}

async fn cold_and_warm_event_traces(protocol: &str, endpoint: &str, received: Received) {
    let kube = FakeKube::start(Options::default()).await;
    kube.create_opted_in_vm(NS, VM, annotations("60s"));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let activator = Activator::spawn_with_env(
        &[
            "--backend",
            "kubevirt",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--auth",
            "none",
            "--log-format",
            "json",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
            // Export every 100 ms instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("RUST_LOG", "info,vm_activator::ingress=debug"),
        ],
    )
    .await;
    activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    activator
        .wait_vm_state(NS, VM, "stopped", Duration::from_secs(10))
        .await;

    // Ids unique in the process: the guests' record of traceparents is shared.
    let cold = Sent::new(
        format!("cold-{protocol}"),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
    );
    let warm = Sent::new(
        format!("warm-{protocol}"),
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
    );
    assert_eq!(cold.send(&activator).await, 202);
    assert_eq!(warm.send(&activator).await, 202);
    // Refused (no ce-type): traced too, with the refusal as its outcome.
    let invalid = reqwest::Client::new()
        .post(format!("{}/{NS}/{VM}", activator.ingress))
        .header("ce-specversion", "1.0")
        .header("ce-id", format!("bad-{protocol}"))
        .header("ce-source", "/shop")
        .header("traceparent", format!("00-{REFUSED_TRACE}-00f067aa0ba902b7-01"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), 400);

    let spans = wait_for_spans(&received, &[&cold, &warm]).await;
    assert_eq!(received.service_names(), BTreeSet::from(["vm-activator".to_string()]));

    // The cold event: held through the start call, the boot and the probe, then forwarded.
    let event = cold.event_span(&spans);
    assert_eq!(hex(&event.parent_span_id), cold.parent, "a child of the sender's span");
    assert_eq!(event.kind, SpanKind::Server as i32);
    for (key, value) in [
        ("namespace", NS),
        ("vm", VM),
        ("cloudevents.event_type", "com.example.order"),
        ("cloudevents.event_id", cold.id.as_str()),
        ("outcome", "delivered"),
    ] {
        assert_eq!(
            attribute(event, key).and_then(|v| string(&v)).as_deref(),
            Some(value),
            "{key}"
        );
    }
    assert_eq!(attribute(event, "cold"), Some(Value::BoolValue(true)));
    assert_eq!(
        attribute(event, "http.response.status_code"),
        Some(Value::IntValue(202))
    );
    assert_eq!(names(&children(&spans, event)), ["held", "forward"]);
    let held = child(&spans, event, "held");
    assert_eq!(names(&children(&spans, held)), ["start call", "boot", "probe"]);
    let phases = children(&spans, held);
    for pair in phases.windows(2) {
        assert!(
            pair[0].end_time_unix_nano <= pair[1].start_time_unix_nano,
            "phases in order: {phases:?}"
        );
    }
    assert!(held.start_time_unix_nano <= phases[0].start_time_unix_nano);
    assert!(phases[2].end_time_unix_nano <= held.end_time_unix_nano);
    assert!(held.end_time_unix_nano <= child(&spans, event, "forward").start_time_unix_nano + 1_000_000);
    cold.assert_guest_parent_is(&spans, event);

    // The warm event: straight to the guest.
    let event = warm.event_span(&spans);
    assert_eq!(hex(&event.parent_span_id), warm.parent);
    assert_eq!(attribute(event, "cold"), Some(Value::BoolValue(false)));
    assert_eq!(names(&children(&spans, event)), ["forward"]);
    let forward = child(&spans, event, "forward");
    assert_eq!(forward.kind, SpanKind::Client as i32);
    assert_eq!(attribute(forward, "attempts"), Some(Value::IntValue(1)));
    warm.assert_guest_parent_is(&spans, event);

    let refused = spans
        .iter()
        .find(|s| s.name == "deliver event" && hex(&s.trace_id) == REFUSED_TRACE)
        .expect("the refused event's span");
    assert_eq!(
        attribute(refused, "outcome").and_then(|v| string(&v)).as_deref(),
        Some("invalid_event")
    );
    assert_eq!(
        attribute(refused, "http.response.status_code"),
        Some(Value::IntValue(400))
    );
    assert!(children(&spans, refused).is_empty(), "neither held nor forwarded");

    // Logs: the start names the event's trace; every line inside a request carries it.
    let logs = activator.logs.as_ref().unwrap().lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = logs.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let scaled_up = lines
        .iter()
        .find(|l| l["fields"]["reason"] == "ScaledUp")
        .expect("a ScaledUp line");
    assert_eq!(scaled_up["fields"]["trace_id"], cold.trace);
    let request_span = |line: &serde_json::Value| {
        let spans = line["spans"].as_array()?;
        spans.iter().find(|s| s["name"] == "event").cloned()
    };
    let traces: BTreeSet<String> = lines
        .iter()
        .filter_map(request_span)
        .map(|span| span["trace_id"].as_str().unwrap_or("none").to_string())
        .collect();
    assert_eq!(
        traces,
        BTreeSet::from([cold.trace, warm.trace, REFUSED_TRACE].map(String::from)),
        "every line inside a request carries its trace id; each request logged"
    );
    // A refusal begins a rejected burst: one INFO line at once.
    let rejected = lines
        .iter()
        .find(|l| l["fields"]["reason"] == "Rejected")
        .expect("a Rejected line");
    assert_eq!(rejected["fields"]["code"], "invalid_event");
    assert_eq!(rejected["fields"]["vm"], format!("{NS}/{VM}"));
}

/// One event sent with a `traceparent`.
struct Sent {
    id: String,
    trace: &'static str,
    parent: &'static str,
}

impl Sent {
    fn new(id: String, trace: &'static str, parent: &'static str) -> Sent {
        Sent { id, trace, parent }
    }

    async fn send(&self, activator: &Activator) -> u16 {
        reqwest::Client::new()
            .post(format!("{}/{NS}/{VM}", activator.ingress))
            .header("ce-specversion", "1.0")
            .header("ce-id", &self.id)
            .header("ce-source", "/shop")
            .header("ce-type", "com.example.order")
            .header("content-type", "application/json")
            .header("traceparent", format!("00-{}-{}-01", self.trace, self.parent))
            .body("{}")
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    fn event_span<'a>(&self, spans: &'a [Span]) -> &'a Span {
        spans
            .iter()
            .find(|s| s.name == "deliver event" && hex(&s.trace_id) == self.trace)
            .unwrap_or_else(|| panic!("no event span in trace {}: {spans:?}", self.trace))
    }

    /// The guest got `traceparent: 00-{trace}-{forward span}-01`.
    fn assert_guest_parent_is(&self, spans: &[Span], event: &Span) {
        let forward = child(spans, event, "forward");
        let got = fake_kube::guest::traceparent_of(&self.id).expect("the guest got a traceparent");
        assert_eq!(got, format!("00-{}-{}-01", self.trace, hex(&forward.span_id)));
    }
}

/// Waits until both events' traces are complete: their event spans and their children.
async fn wait_for_spans(received: &Received, sent: &[&Sent]) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = received.spans();
        let complete = sent.iter().all(|s| {
            spans
                .iter()
                .any(|span| span.name == "deliver event" && hex(&span.trace_id) == s.trace)
                && spans
                    .iter()
                    .any(|span| span.name == "forward" && hex(&span.trace_id) == s.trace)
        }) && spans.iter().any(|span| span.name == "probe")
            && spans.iter().any(|span| hex(&span.trace_id) == REFUSED_TRACE);
        if complete {
            return spans;
        }
        assert!(Instant::now() < deadline, "spans never came: {spans:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    let mut found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
        .collect();
    found.sort_by_key(|s| s.start_time_unix_nano);
    found
}

fn child<'a>(spans: &'a [Span], parent: &Span, name: &str) -> &'a Span {
    children(spans, parent)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} under {}", parent.name))
}

fn names(spans: &[&Span]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn string(value: &Value) -> Option<String> {
    match value {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
