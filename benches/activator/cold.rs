//! Cold starts: N cold starts of distinct VMs through the fake backend in this process
//! (overhead = client-observed cold start − the instant the guest server started
//! listening; start signal = request sent → backend start call issued, the request
//! sent on a keep-alive connection the bench drives in its own task), and cold
//! starts through the KubeVirt backend against the fake API server.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;
use vm_activator::backend::fake::{FakeBackend, FakeOptions};
use vm_activator::config::Config;
use vm_activator::server;
use vm_activator::vm::{Policy, VmKey};

use crate::report::{ms, percentile, target};
use crate::Mode;

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

/// The i-th of evenly spread offsets within one readiness probe interval (the
/// interval of `Config::for_tests`), in a fixed order that does not follow `i`.
fn spread_over_probe_interval(i: usize) -> Duration {
    let interval = Config::for_tests().readiness.interval;
    let steps = 20;
    interval * ((i * 7) % steps) as u32 / steps as u32
}

/// One HTTP/1.1 keep-alive connection whose sending half and connection are driven in
/// the caller's task (no connection task, no hop between the two).
struct Sender {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    connection: std::pin::Pin<Box<hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>>>,
}

impl Sender {
    async fn connect(addr: std::net::SocketAddr) -> Sender {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        Sender {
            send,
            connection: Box::pin(connection),
        }
    }

    /// `request` as a sender on a connection of its own writes it: origin-form target,
    /// `Host` header (a pooled client does this on its way).
    fn origin_form(mut request: hyper::Request<Full<Bytes>>) -> hyper::Request<Full<Bytes>> {
        let host = request.uri().authority().expect("an absolute URI").as_str().to_owned();
        let target = request.uri().path_and_query().expect("a path").as_str().to_owned();
        *request.uri_mut() = target.parse().expect("valid");
        let host = host.parse().expect("valid");
        request.headers_mut().insert(hyper::header::HOST, host);
        request
    }

    /// Sends `request` and reads the whole answer; returns its status.
    async fn exchange(&mut self, request: hyper::Request<Full<Bytes>>) -> hyper::StatusCode {
        let connection = &mut self.connection;
        let exchange = async {
            let response = self.send.send_request(request).await.expect("exchange");
            let status = response.status();
            let _ = response.into_body().collect().await;
            status
        };
        tokio::select! {
            biased;
            status = exchange => status,
            ended = connection => panic!("the connection ended: {ended:?}"),
        }
    }
}

/// Waits `wait` on a thread of its own, so the wake-up is not on the timer grid.
async fn pause_off_grid(wait: Duration) {
    let (done, woken) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(wait);
        let _ = done.send(());
    });
    let _ = woken.await;
}

/// Cold starts through the fake backend: overhead and start signal.
pub async fn fake_backend(mode: Mode) {
    let quick = mode.quick;
    let n = if quick { 5 } else { 300 };
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
            precise_boot: true,
            ..FakeOptions::default()
        },
    );
    let server = server::start(Config::for_tests(), backend.clone())
        .await
        .expect("server");
    // One keep-alive connection, driven in this task: "request sent" is when the request
    // goes out, not when a pooled client's connection task gets round to writing it.
    let mut sender = Sender::connect(server.ingress_addr).await;
    let mut overheads = Vec::new();
    let mut signals = Vec::new();
    let mut totals = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        // Spread the guests' boot times over one probe interval: with one fixed boot
        // time, the wait for the first probe after the guest listens would depend on
        // when probing began modulo the interval, not on the activator.
        let spread = spread_over_probe_interval(i);
        backend.set_options(|o| o.boot_delay = boot + spread);
        // And start each cold start at another phase of the runtime's 1 ms timer grid
        // (the probe's ticks sit on it): back to back, every start would have the same.
        pause_off_grid(spread_over_probe_interval(i * 3 + 1)).await;
        let uri = format!("http://{}/{}/{}", server.ingress_addr, key.namespace, key.name);
        let request = Sender::origin_form(event(&uri, 1));
        let sent = Instant::now();
        let status = sender.exchange(request).await;
        assert!(status.is_success(), "cold start answered {status}");
        let answered = Instant::now();
        let log = backend.guest_log(key);
        let log = log.lock().expect("log");
        let listening = log.listening_since[0];
        let start_called = log.start_calls[0];
        if std::env::var("BENCH_DEBUG").is_ok() {
            let vm = server.activator.vm(&key.namespace, &key.name).expect("VM");
            eprintln!(
                "listening→answered {:?}, cold_start {:?}",
                answered.saturating_duration_since(listening),
                vm.gate().last_cold_start()
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
    println!(
        "\n## Cold start ({n} cold starts, fake guest listening {boot:?} to {:?} after the start call)\n",
        boot + Config::for_tests().readiness.interval
    );
    println!("| measure | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|");
    row("client-observed cold start", &totals);
    row("overhead: answer − guest listening", &overheads);
    row("start signal: request sent → start call", &signals);
    target(
        "cold-start overhead ≤ 5 ms p99",
        format!("p99 {} ms ({n} cold starts)", ms(percentile(&overheads, 0.99))),
        percentile(&overheads, 0.99) <= Duration::from_millis(5),
    );
    target(
        "start signal ≤ 0.5 ms p99",
        format!(
            "p50 {} ms, p99 {} ms",
            ms(percentile(&signals, 0.5)),
            ms(percentile(&signals, 0.99))
        ),
        percentile(&signals, 0.99) <= Duration::from_micros(500),
    );
    server.drain().await;
}

/// Cold starts through the KubeVirt backend against the fake kube-apiserver: what the
/// activator adds on top of the simulated cluster's own timeline, and how many API
/// requests one cold start costs.
pub async fn kubevirt(mode: Mode) {
    let quick = mode.quick;
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
    // Every VM listed and every watch synced (what `/readyz` reports): before the VMI
    // watch has synced, an event for a stopped VM is refused with 503 `backend_unavailable`.
    while server.activator.vms().len() < n || !server.activator.backend().is_connected() {
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
