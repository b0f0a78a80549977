//! The spans of one event delivered through the ingress, made only while traces are
//! exported ([`super::enabled`]):
//!
//! ```text
//! deliver event   (server; child of the sender's traceparent, W3C trace context)
//! ├── held        (arrival → let in, when it had to wait)
//! │   ├── start call ─┐ the cold start it waited for, as the VM's owner saw it
//! │   ├── boot        │ (resume / restore instead of boot), clipped to its wait
//! │   └── probe      ─┘
//! └── forward     (client; its context is the traceparent the guest gets)
//! ```
//!
//! Attributes: `namespace`, `vm`, `cloudevents.event_type`/`_id`/`_source`, `cold`,
//! `outcome` (`delivered`, `guest_error`, `prewarm` or the refusal's code),
//! `http.response.status_code`, and `attempts` on `forward`. `held` and the phases are
//! recorded after the fact with their real start and end times (the owner keeps the
//! timeline; spans cost nothing while nobody traces).

use std::time::SystemTime;

use http::HeaderMap;
use opentelemetry::propagation::Extractor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, TraceContextExt, Tracer};
use opentelemetry::KeyValue;
use opentelemetry_http::HeaderInjector;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TRACE_TARGET;
use crate::http1::lines::{text, ReadFields};

/// A request's header fields as the trace context propagator reads them (as
/// `opentelemetry_http::HeaderExtractor` reads a map, for fields kept either way).
struct FieldsExtractor<'a, H>(&'a H);

impl<H: ReadFields> Extractor for FieldsExtractor<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.field(key).and_then(text)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .fields()
            .filter_map(|(name, _)| std::str::from_utf8(name).ok())
            .collect()
    }
}

/// The span of one request on the ingress, a child of the sender's `traceparent` (a new
/// trace without one). Its `trace_id` field puts the trace id on every log line made
/// while it is current.
pub fn span(headers: &impl ReadFields) -> Span {
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "event",
        otel.name = "deliver event",
        otel.kind = "server",
        otel.status_code = Empty,
        namespace = Empty,
        vm = Empty,
        cloudevents.event_type = Empty,
        cloudevents.event_id = Empty,
        cloudevents.event_source = Empty,
        cold = Empty,
        outcome = Empty,
        http.response.status_code = Empty,
        trace_id = Empty,
    );
    let parent = TraceContextPropagator::new().extract(&FieldsExtractor(headers));
    // Only fails when the span is disabled (no exporter): then there is nothing to do.
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id();
    span.record("trace_id", tracing::field::display(trace_id));
    span
}

/// The trace id of `span` (hex), for lines logged outside it (the VM's `ScaledUp`).
pub fn trace_id(span: &Span) -> String {
    span.context().span().span_context().trace_id().to_string()
}

/// The VM the request is for.
pub fn target(span: &Span, namespace: &str, vm: &str) {
    span.record("namespace", namespace);
    span.record("vm", vm);
}

/// The CloudEvent's attributes (`type` is absent for a batch).
pub fn cloudevent(span: &Span, event_type: Option<&str>, id: &str, source: &str) {
    if let Some(event_type) = event_type {
        span.record("cloudevents.event_type", event_type);
    }
    span.record("cloudevents.event_id", id);
    span.record("cloudevents.event_source", source);
}

/// A cold start's phase: its name, when it began and when it ended.
pub type Phase = (&'static str, Instant, Instant);

/// The request went straight in (the warm path).
pub fn went_in(span: &Span) {
    span.record("cold", false);
}

/// The request was held from `since` until now: a `held` span covers the wait, with the
/// cold start's `phases` it waited through under it.
pub fn held(span: &Span, since: Instant, phases: impl IntoIterator<Item = Phase>) {
    let Some(tracer) = super::tracer() else {
        return;
    };
    let now = Instant::now();
    let wall_now = SystemTime::now();
    let wall = |at: Instant| wall_now - now.saturating_duration_since(at);
    let parent = span.context();
    let held = tracer
        .span_builder("held")
        .with_start_time(wall(since))
        .start_with_context(tracer, &parent);
    let held = parent.with_span(held);
    let mut cold = false;
    for (name, from, to) in phases {
        cold = true;
        // Only what this request waited through: a later arrival joined mid-way.
        let (from, to) = (from.max(since), to.min(now));
        if from >= to {
            continue;
        }
        tracer
            .span_builder(name)
            .with_start_time(wall(from))
            .start_with_context(tracer, &held)
            .end_with_timestamp(wall(to));
    }
    held.span().set_attribute(KeyValue::new("cold", cold));
    held.span().end_with_timestamp(wall_now);
    span.record("cold", cold);
}

/// The `forward` span (a child of `span`), its context written into `headers` as the
/// `traceparent` (and `tracestate`) the guest gets.
pub fn forward(span: &Span, headers: &mut HeaderMap) -> Span {
    let forward = tracing::info_span!(
        target: TRACE_TARGET,
        parent: span,
        "forward",
        otel.kind = "client",
        attempts = Empty,
    );
    TraceContextPropagator::new().inject_context(&forward.context(), &mut HeaderInjector(headers));
    forward
}

/// How the request ended: the status it was answered with and what happened.
pub fn outcome(span: &Span, status: u16, outcome: &str) {
    // As i64: tracing-opentelemetry exports unsigned integers as strings.
    span.record("http.response.status_code", i64::from(status));
    span.record("outcome", outcome);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
}
