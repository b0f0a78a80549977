//! Benchmarks, side by side in one run (timings on a shared 2-core machine are noisy:
//! read the ratios, not the absolute numbers). Uses the fake backend, whose guest is a
//! hyper HTTP server on loopback.
//!
//! - Warm path: the same closed-loop load generator (a pooled hyper client, keep-alive,
//!   C concurrent workers) against the guest directly and through the activator.
//! - Cold start: N cold starts of distinct VMs; overhead = client-observed cold start −
//!   the instant the guest server started listening; start signal = request sent →
//!   backend start call issued.
//!
//! `cargo bench` for the full run; `cargo bench -- --quick` (or BENCH_QUICK=1) for the
//! smoke run CI does. BENCH_DEBUG=1 logs each cold start step (vm_activator=debug) and
//! per-start timings to stderr; BENCH_SKIP_WARM=1 runs only the cold starts.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use vm_activator::backend::fake::{FakeBackend, FakeOptions};
use vm_activator::config::Config;
use vm_activator::server;
use vm_activator::vm::{Policy, VmKey};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

fn event(uri: &str, id: u64) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post(uri)
        .header("ce-specversion", "1.0")
        .header("ce-id", id.to_string())
        .header("ce-source", "/bench")
        .header("ce-type", "bench.event")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"reading\":42}")))
        .expect("valid request")
}

struct LoadResult {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Closed loop: `concurrency` workers each send one request, wait for the full answer,
/// and repeat until `duration` has passed.
async fn load(client: &HttpClient, uri: &str, concurrency: usize, duration: Duration) -> LoadResult {
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (client, uri) = (client.clone(), uri.to_string());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut n = (w as u64) << 40;
            while Instant::now() < deadline {
                n += 1;
                let t = Instant::now();
                match client.request(event(&uri, n)).await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.into_body().collect().await;
                        latencies.push(t.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e) = w.await.expect("worker");
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    LoadResult {
        requests: latencies.len(),
        errors,
        elapsed,
        latencies,
    }
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

async fn warm_path(quick: bool) {
    let key = VmKey::new("bench", "warm");
    let policy = Policy {
        readiness: "http:/healthz".parse().expect("valid"),
        idle_timeout: Duration::from_secs(3600),
        ..Policy::default()
    };
    let backend = FakeBackend::new([(key.clone(), policy)], FakeOptions::default());
    let server = server::start(Config::for_tests(), backend.clone())
        .await
        .expect("server");
    let client = client();
    let through = format!("http://{}/bench/warm", server.ingress_addr);
    // One request to boot the VM; afterwards it is warm.
    let first = client.request(event(&through, 0)).await.expect("cold start");
    assert!(first.status().is_success());
    let guest: SocketAddr = server
        .activator
        .gate("bench", "warm")
        .expect("gate")
        .state()
        .endpoint
        .expect("ready");
    let direct = format!("http://{guest}/");
    let duration = if quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(3)
    };

    println!(
        "\n## Warm path (fake guest on loopback, closed loop, {:?} per cell)\n",
        duration
    );
    println!("| concurrency | target | req/s | p50 µs | p99 µs | errors |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut summary = Vec::new();
    for concurrency in [1usize, 16, 64] {
        // Alternate direct and activator runs so drift on the machine hits both.
        let d = load(&client, &direct, concurrency, duration).await;
        let a = load(&client, &through, concurrency, duration).await;
        for (name, r) in [("direct", &d), ("activator", &a)] {
            println!(
                "| {concurrency} | {name} | {:.0} | {} | {} | {} |",
                r.rps(),
                us(r.percentile(0.5)),
                us(r.percentile(0.99)),
                r.errors
            );
        }
        summary.push((
            concurrency,
            a.rps() / d.rps(),
            a.percentile(0.5).saturating_sub(d.percentile(0.5)),
        ));
    }
    println!("\n| concurrency | throughput activator/direct | added p50 µs |");
    println!("|---:|---:|---:|");
    for (c, ratio, added) in summary {
        println!("| {c} | {ratio:.2} | {} |", us(added));
    }
    server.drain().await;
}

async fn cold_starts(quick: bool) {
    let n = if quick { 5 } else { 50 };
    let boot = Duration::from_millis(200);
    let keys: Vec<VmKey> = (0..n).map(|i| VmKey::new("bench", format!("cold-{i}"))).collect();
    let policy = Policy {
        readiness: "http:/healthz".parse().expect("valid"),
        ..Policy::default()
    };
    let backend = FakeBackend::new(
        keys.iter().map(|k| (k.clone(), policy.clone())),
        FakeOptions {
            boot_delay: boot,
            ..FakeOptions::default()
        },
    );
    let server = server::start(Config::for_tests(), backend.clone())
        .await
        .expect("server");
    let client = client();
    let mut overheads = Vec::new();
    let mut signals = Vec::new();
    let mut totals = Vec::new();
    for key in &keys {
        let uri = format!("http://{}/{}/{}", server.ingress_addr, key.namespace, key.name);
        let sent = Instant::now();
        let response = client.request(event(&uri, 1)).await.expect("cold start");
        let _ = response.into_body().collect().await;
        let answered = Instant::now();
        let log = backend.guest_log(key);
        let log = log.lock().expect("log");
        let listening = log.listening_since[0];
        let start_called = log.start_calls[0];
        if std::env::var("BENCH_DEBUG").is_ok() {
            let gate = server.activator.gate(&key.namespace, &key.name).expect("gate");
            eprintln!(
                "listening→answered {:?}, cold_start {:?}",
                answered.saturating_duration_since(listening),
                gate.last_cold_start()
            );
        }
        overheads.push(answered.saturating_duration_since(listening));
        signals.push(start_called.saturating_duration_since(sent));
        totals.push(answered - sent);
    }
    overheads.sort();
    signals.sort();
    totals.sort();
    let row = |name: &str, v: &[Duration]| {
        println!(
            "| {name} | {} | {} | {} |",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(*v.last().expect("non-empty"))
        );
    };
    println!("\n## Cold start ({n} cold starts, fake guest listening {boot:?} after the start call)\n");
    println!("| measure | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|");
    row("client-observed cold start", &totals);
    row("overhead: answer − guest listening", &overheads);
    row("start signal: request sent → start call", &signals);
    server.drain().await;
}

/// Cold starts through the KubeVirt backend against the fake kube-apiserver: what the
/// activator adds on top of the simulated cluster's own timeline, and how many API
/// requests one cold start costs.
async fn kubevirt_cold_starts(quick: bool) {
    use fake_kube::{FakeKube, Options};
    use vm_activator::backend::kubevirt::KubevirtBackend;
    use vm_activator::config::KubevirtConfig;

    let n = if quick { 3 } else { 20 };
    let options = Options::default();
    let cluster_time = options.schedule_delay + options.running_delay + options.guest_delay;
    let kube = FakeKube::start(options).await;
    for i in 0..n {
        kube.create_opted_in_vm(
            "bench",
            &format!("vm-{i}"),
            serde_json::json!({"vm-activator.io/readiness": "http:/healthz"}),
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = KubevirtConfig {
        kubeconfig: Some(kube.write_kubeconfig(dir.path())),
        ..KubevirtConfig::default()
    };
    let backend = KubevirtBackend::connect(config).await.expect("backend");
    let server = server::start(Config::for_tests(), backend).await.expect("server");
    while server.activator.gates().len() < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = client();
    let mut totals = Vec::new();
    let api_before = kube.count(|r| !r.is_watch());
    for i in 0..n {
        let uri = format!("http://{}/bench/vm-{i}", server.ingress_addr);
        let sent = Instant::now();
        let response = client.request(event(&uri, 1)).await.expect("cold start");
        assert!(response.status().is_success(), "{}", response.status());
        let _ = response.into_body().collect().await;
        totals.push(sent.elapsed());
    }
    let api_requests = kube.count(|r| !r.is_watch()) - api_before;
    totals.sort();
    println!("\n## KubeVirt cold start ({n} VMs, fake API server; simulated cluster: VMI created → guest listening in {cluster_time:?})\n");
    println!("| measure | p50 ms | max ms |");
    println!("|---|---:|---:|");
    println!(
        "| client-observed cold start | {} | {} |",
        ms(percentile(&totals, 0.5)),
        ms(*totals.last().expect("non-empty"))
    );
    println!(
        "\nAPI requests per cold start (besides the watches): {:.1}",
        api_requests as f64 / n as f64
    );
    server.drain().await;
}

fn main() {
    if std::env::var("BENCH_DEBUG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter("vm_activator=debug")
            .with_writer(std::io::stderr)
            .init();
    }
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "# vm-activator benchmarks ({} mode, {} CPUs)",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    runtime.block_on(async {
        if std::env::var("BENCH_SKIP_WARM").is_err() {
            warm_path(quick).await;
        }
        cold_starts(quick).await;
        kubevirt_cold_starts(quick).await;
    });
}
