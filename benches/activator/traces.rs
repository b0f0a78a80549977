//! What traces cost on the warm path: the same binary twice in front of the same guest,
//! once with traces off (no OTEL_* variables: the default) and once exporting every
//! request's spans over OTLP/HTTP to a receiver in this process, side by side at
//! concurrency 1, 16 and 64 with the order rotated. With traces off no span is made at
//! all (one relaxed atomic load per request), so the "off" row is the warm path itself;
//! what "off" costs against a build without tracing is counted by the `instructions`
//! section.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fake_kube::FakeKube;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;

use crate::load::{Generator, LoadResult};
use crate::procs::ActivatorProcess;
use crate::report::us;
use crate::warm::{warm_annotations, warm_vm};
use crate::Mode;

/// An OTLP/HTTP receiver on a free loopback port that counts the spans it gets.
async fn receiver() -> (String, Arc<AtomicU64>) {
    let spans = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let counted = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counted = counted.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap_or_default();
                let n: usize = request
                    .resource_spans
                    .iter()
                    .flat_map(|r| &r.scope_spans)
                    .map(|s| s.spans.len())
                    .sum();
                counted.fetch_add(n as u64, Ordering::Relaxed);
                let answer = ExportTraceServiceResponse { partial_success: None }.encode_to_vec();
                ([("content-type", "application/x-protobuf")], answer)
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (endpoint, spans)
}

/// Traces off vs on at concurrency 1, 16 and 64.
pub async fn run(mode: Mode, generator: &Generator) {
    let kube = FakeKube::start(fake_kube::Options::default()).await;
    kube.create_opted_in_vm("bench", "warm", warm_annotations());
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let (endpoint, spans) = receiver().await;
    let off = ActivatorProcess::kubevirt_with_env("", &kubeconfig, dir.path(), "", &[]).await;
    let on = ActivatorProcess::kubevirt_with_env(
        "",
        &kubeconfig,
        dir.path(),
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "1000"),
        ],
    )
    .await;
    warm_vm(&kube, &off, "warm").await;
    warm_vm(&kube, &on, "warm").await;
    let duration = if mode.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let off_url = format!("http://{}/bench/warm", off.ingress);
    let on_url = format!("http://{}/bench/warm", on.ingress);

    println!(
        "\n## Warm path with traces off and on, {} s per cell\n",
        duration.as_secs()
    );
    println!(
        "Load generator: {}. \"on\": every request traced (no sampling) and exported over \
         OTLP/HTTP to a receiver in the bench process, the batch processor's default bounds \
         (queue 2048 spans: beyond that spans are dropped, not requests slowed).",
        generator.describe()
    );
    println!("\n| concurrency | traces | req/s | p50 µs | p99 µs | errors |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (round, concurrency) in [1usize, 16, 64].into_iter().enumerate() {
        let mut targets = vec![("off", &off_url), ("on", &on_url)];
        targets.rotate_left(round % 2);
        let mut results: Vec<(&str, LoadResult)> = Vec::new();
        for (name, url) in targets {
            results.push((name, generator.run(url, concurrency, duration).await));
        }
        results.sort_by_key(|(name, _)| *name != "off");
        for (name, r) in &results {
            println!(
                "| {concurrency} | {name} | {:.0} | {} | {} | {} |",
                r.rps,
                us(r.p50),
                us(r.p99),
                r.errors
            );
        }
        rows.push((concurrency, results[0].1, results[1].1));
    }
    // Let the last batch go out before counting.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    println!("\n| concurrency | throughput on/off | added p50 µs (on − off) |");
    println!("|---:|---:|---:|");
    for (concurrency, off, on) in &rows {
        println!(
            "| {concurrency} | {:.2} | {} |",
            on.rps / off.rps,
            us(on.p50.saturating_sub(off.p50))
        );
    }
    let traced_requests: f64 = rows.iter().map(|(_, _, on)| on.rps * duration.as_secs_f64()).sum();
    println!(
        "\nSpans received: {} for about {:.0} traced requests (2 per warm request: `deliver event` and `forward`; \
         fewer means the batch queue was full and spans were dropped).",
        spans.load(Ordering::Relaxed),
        traced_requests
    );
}
