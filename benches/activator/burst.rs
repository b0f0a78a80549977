//! Burst: 10,000 events held by the real binary during one cold start (the fake cluster
//! keeps the guest from listening until every event is held), then released. Checks
//! every event reached the guest exactly once and measures the activator's RSS growth
//! per held event (the executable's code mapped meanwhile not counted: it is mapped
//! once, whatever the number of events). Run twice, each with a fresh activator: every
//! event on its own HTTP/1.1 connection (as 10,000 separate senders would deliver them),
//! and HTTP/2 with 100 events per connection (which separates the cost of a held event
//! from the cost of its connection).

use std::sync::Arc;
use std::time::Duration;

use fake_kube::FakeKube;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::procs::ActivatorProcess;
use crate::report::{mib, target};
use crate::Mode;

/// POSTs one binary-mode event with its own connection (`Connection: close`); returns
/// the status code, 0 if the exchange failed.
pub async fn post_once(url: &str, id: &str, body: &[u8]) -> u16 {
    let Some(rest) = url.strip_prefix("http://") else {
        return 0;
    };
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Ok(mut stream) = tokio::net::TcpStream::connect(host).await else {
        return 0;
    };
    let _ = stream.set_nodelay(true);
    if stream.write_all(&request(host, path, id, body)).await.is_err() {
        return 0;
    }
    read_status(&mut stream).await
}

/// One binary-mode CloudEvent POST with `Connection: close`, as bytes on the wire.
fn request(host: &str, path: &str, id: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         ce-specversion: 1.0\r\nce-id: {id}\r\nce-source: /bench\r\nce-type: bench.event\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

async fn read_status(stream: &mut tokio::net::TcpStream) -> u16 {
    let mut response = Vec::new();
    if stream.read_to_end(&mut response).await.is_err() && response.is_empty() {
        return 0;
    }
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// How the burst's events reach the activator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// One HTTP/1.1 connection per event.
    Http1PerEvent,
    /// HTTP/2 (prior knowledge), this many events per connection.
    Http2(usize),
}

impl Transport {
    /// The target for memory per held event beyond its body (docs/architecture.md).
    fn memory_target_kib(self) -> usize {
        match self {
            Transport::Http1PerEvent => 12,
            Transport::Http2(_) => 3,
        }
    }

    fn describe(self) -> String {
        match self {
            Transport::Http1PerEvent => "each event on its own HTTP/1.1 connection".into(),
            Transport::Http2(per) => format!("HTTP/2, {per} events per connection"),
        }
    }
}

/// What one burst measured.
struct BurstResult {
    held: f64,
    statuses: std::collections::BTreeMap<u16, usize>,
    accepted: usize,
    delivered_once: usize,
    duplicates: usize,
    missing: usize,
    all_held: Duration,
    drained: Duration,
    before_kib: u64,
    at_peak_kib: u64,
    peak_kib: u64,
    /// Mapped files (the executable's code) the RSS grew by until all were held.
    code_kib: u64,
    per_event: f64,
    beyond_body: f64,
}

/// Runs the burst over both transports and prints one table.
pub async fn run(mode: Mode) {
    let n: usize = if mode.quick { 2_000 } else { 10_000 };
    let mut rows = Vec::new();
    for transport in [Transport::Http1PerEvent, Transport::Http2(100)] {
        rows.push((transport, burst(n, transport).await));
    }
    println!("\n## Burst: {n} events held during one cold start (real binary, KubeVirt backend, fake cluster)\n");
    println!("The guest listens only once all are held; concurrency 64 to the guest; a fresh activator per row.\n");
    println!("| transport | held at once | answers | delivered exactly once / duplicates / missing | hold all / deliver all | RSS before / all held / peak MiB | of which code mapped meanwhile MiB | RSS growth per held event, code not counted (beyond its body) |");
    println!("|---|---:|---|---|---|---|---:|---:|");
    for (transport, r) in &rows {
        println!(
            "| {} | {:.0} | {} | {} / {} / {} | {:.2} s / {:.2} s | {} / {} / {} | {} | {:.0} B ({:.0} B) |",
            transport.describe(),
            r.held,
            format_statuses(&r.statuses),
            r.delivered_once,
            r.duplicates,
            r.missing,
            r.all_held.as_secs_f64(),
            r.drained.as_secs_f64(),
            mib(r.before_kib),
            mib(r.at_peak_kib),
            mib(r.peak_kib),
            mib(r.code_kib),
            r.per_event,
            r.beyond_body,
        );
    }
    for (transport, r) in &rows {
        target(
            format!("burst of {n} ({}): all delivered exactly once", transport.describe()),
            format!(
                "{} exactly once, {} × 202, {} duplicates",
                r.delivered_once, r.accepted, r.duplicates
            ),
            r.delivered_once == n && r.accepted == n && r.duplicates == 0,
        );
        let bound_kib = transport.memory_target_kib();
        target(
            format!(
                "≤ {bound_kib} KiB memory growth per held event beyond its body ({})",
                transport.describe()
            ),
            format!("{:.0} B", r.beyond_body),
            r.beyond_body <= (bound_kib * 1024) as f64,
        );
    }
}

async fn burst(n: usize, transport: Transport) -> BurstResult {
    let kube = FakeKube::start(fake_kube::Options::default()).await;
    kube.create_opted_in_vm(
        "bench",
        "burst",
        json!({
            "vm-activator.io/readiness": "http:/healthz",
            "vm-activator.io/idle-timeout": "1h",
            "vm-activator.io/start-timeout": "10m",
            "vm-activator.io/max-buffered": n.to_string(),
            "vm-activator.io/concurrency": "64",
        }),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let activator = ActivatorProcess::kubevirt(
        &kubeconfig,
        dir.path(),
        "ingress:\n  max_concurrent_requests: 20000\n  max_connections: 20000\n",
    )
    .await;
    activator.wait_vms(1, Duration::from_secs(30)).await;
    // Settle: let start-up allocations finish before the baseline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = activator.memory();
    crate::procs::reset_peak(activator.pid());
    kube.hold_guests(true);

    let url = Arc::new(format!("http://{}/bench/burst", activator.ingress));
    let body_bytes: usize = (0..n).map(|i| format!("{{\"n\":{i}}}").len()).sum();
    let started = Instant::now();
    let mut senders = match transport {
        Transport::Http1PerEvent => send_http1(&url, n),
        Transport::Http2(per) => send_http2(&url, n, per),
    };
    let labels = [("namespace", "bench"), ("vm", "burst")];
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut held = 0.0;
    while held < n as f64 {
        assert!(Instant::now() < deadline, "only {held} of {n} events were held");
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = activator
            .metric("vm_activator_buffered_requests", &labels)
            .await
            .unwrap_or(0.0);
    }
    let all_held = started.elapsed();
    let at_peak = activator.memory();
    let released = Instant::now();
    kube.hold_guests(false);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(status) = senders.join_next().await {
        *statuses.entry(status.unwrap_or(0)).or_default() += 1;
    }
    let drained = released.elapsed();
    let after = activator.memory();

    let log = kube.guest_events("bench", "burst");
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for id in &log {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let delivered_once = (0..n)
        .filter(|i| seen.get(format!("burst-{i}").as_str()) == Some(&1))
        .count();
    let duplicates = seen.values().filter(|&&c| c > 1).count();
    let accepted = statuses.get(&202).copied().unwrap_or(0);

    let peak_kib = at_peak.rss_kib.max(after.peak_kib);
    // What holding costs, not the code that first runs meanwhile: the executable's pages
    // the burst faulted in (an HTTP/2 server's, say) are mapped once, whatever the number
    // of events, and an idle process that maps only the code it ran (link/hot-text.ld)
    // has them still to map. They are subtracted as mapped once all are held (any mapped
    // later, while they are delivered, stay counted).
    let code_kib = at_peak.file_kib.saturating_sub(before.file_kib);
    let growth_bytes = peak_kib.saturating_sub(before.rss_kib).saturating_sub(code_kib) as f64 * 1024.0;
    let per_event = growth_bytes / n as f64;
    let body_avg = body_bytes as f64 / n as f64;
    let beyond_body = per_event - body_avg;

    // Not a timing: a lost or duplicated event is a bug, and fails the run.
    assert!(
        delivered_once == n && accepted == n && duplicates == 0,
        "burst ({}): {delivered_once} of {n} delivered exactly once, {accepted} accepted, {duplicates} duplicated",
        transport.describe()
    );
    BurstResult {
        held,
        statuses,
        accepted,
        delivered_once,
        duplicates,
        missing: n - delivered_once - duplicates.min(n - delivered_once),
        all_held,
        drained,
        before_kib: before.rss_kib,
        at_peak_kib: at_peak.rss_kib,
        peak_kib,
        code_kib,
        per_event,
        beyond_body,
    }
}

/// Every event on its own HTTP/1.1 connection; returns each one's status.
fn send_http1(url: &Arc<String>, n: usize) -> tokio::task::JoinSet<u16> {
    // Connect at most this many at a time: a burst of SYNs beyond the listen backlog
    // would only measure the kernel's SYN retransmit timer.
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..n {
        let (url, connecting) = (url.clone(), connecting.clone());
        senders.spawn(async move {
            let Some(rest) = url.strip_prefix("http://") else {
                return 0;
            };
            let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let permit = connecting.acquire_owned().await.expect("semaphore");
            let Ok(mut stream) = tokio::net::TcpStream::connect(host).await else {
                return 0;
            };
            let body = format!("{{\"n\":{i}}}");
            if stream
                .write_all(&request(host, path, &format!("burst-{i}"), body.as_bytes()))
                .await
                .is_err()
            {
                return 0;
            }
            drop(permit);
            read_status(&mut stream).await
        });
    }
    senders
}

/// HTTP/2 with prior knowledge, `per` concurrent events on each connection (one hyper
/// client per connection); returns each event's status.
fn send_http2(url: &Arc<String>, n: usize, per: usize) -> tokio::task::JoinSet<u16> {
    use http_body_util::{BodyExt, Full};
    let mut senders = tokio::task::JoinSet::new();
    let mut client = None;
    for i in 0..n {
        if i % per == 0 {
            client = Some(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .http2_only(true)
                    .build_http::<Full<bytes::Bytes>>(),
            );
        }
        let (url, client) = (url.clone(), client.clone().expect("a client"));
        senders.spawn(async move {
            let request = hyper::Request::post(url.as_str())
                .header("ce-specversion", "1.0")
                .header("ce-id", format!("burst-{i}"))
                .header("ce-source", "/bench")
                .header("ce-type", "bench.event")
                .header("content-type", "application/json")
                .body(Full::new(bytes::Bytes::from(format!("{{\"n\":{i}}}"))))
                .expect("valid request");
            match client.request(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let _ = response.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            }
        });
    }
    senders
}

fn format_statuses(statuses: &std::collections::BTreeMap<u16, usize>) -> String {
    statuses
        .iter()
        .map(|(status, count)| {
            if *status == 0 {
                format!("{count} × failed")
            } else {
                format!("{count} × {status}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
