//! Warm path: one load generator against (a) the guest server directly, (b) the real
//! `vm-activator` binary (KubeVirt backend, fake API server) in front of it, (c) nginx
//! `proxy_pass` with keep-alive upstreams in front of it — same guest, same run, one
//! target at a time, the order rotated per concurrency level.

use std::net::SocketAddr;
use std::time::Duration;

use fake_kube::FakeKube;
use serde_json::json;

use crate::load::{Generator, LoadResult};
use crate::procs::{cpu_time, ActivatorProcess, Nginx};
use crate::report::{target, us};
use crate::Mode;

/// Boots the VM `bench/{name}` of `kube` with one event through `activator`; returns
/// the guest's address.
pub async fn warm_vm(kube: &FakeKube, activator: &ActivatorProcess, name: &str) -> SocketAddr {
    let url = format!("http://{}/bench/{name}", activator.ingress);
    crate::send_until_accepted(&url).await;
    let vmi = kube.vmi("bench", name).expect("VMI exists after a cold start");
    let ip = vmi["status"]["interfaces"][0]["ipAddress"]
        .as_str()
        .expect("VMI address");
    format!("{ip}:8080").parse().expect("guest address")
}

/// Annotations of a VM the benchmarks keep warm.
pub fn warm_annotations() -> serde_json::Value {
    json!({
        "vm-activator.io/readiness": "http:/healthz",
        "vm-activator.io/idle-timeout": "1h",
    })
}

/// Direct vs activator vs nginx at concurrency 1, 16 and 64.
pub async fn run(mode: Mode, generator: &Generator) {
    let kube = FakeKube::start(fake_kube::Options::default()).await;
    kube.create_opted_in_vm("bench", "warm", warm_annotations());
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let activator = ActivatorProcess::kubevirt(&kubeconfig, dir.path(), "").await;
    let guest = warm_vm(&kube, &activator, "warm").await;
    let nginx_binary = Nginx::binary();
    let nginx = match &nginx_binary {
        Some(binary) => Some(Nginx::start(binary, guest).await),
        None => None,
    };
    let duration = if mode.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let direct_url = format!("http://{guest}/");
    let activator_url = format!("http://{}/bench/warm", activator.ingress);
    let nginx_url = nginx.as_ref().map(|n| format!("http://{}/", n.addr));
    if let Some(seconds) = std::env::var("BENCH_SERVE").ok().and_then(|s| s.parse().ok()) {
        // For profiling by hand: keep the three targets up, say where they are.
        eprintln!(
            "serving for {seconds} s: direct {direct_url} activator {activator_url} (pid {}) nginx {nginx_url:?}",
            activator.pid()
        );
        tokio::time::sleep(Duration::from_secs(seconds)).await;
    }

    println!(
        "\n## Warm path: requests/s and latency, {} per cell\n",
        humantime(duration)
    );
    println!(
        "Load generator: {}. Guest: the fake cluster's HTTP server (answers 202).",
        generator.describe()
    );
    match &nginx_binary {
        Some(binary) => println!(
            "nginx {}: `proxy_pass`, `keepalive 256` upstream, HTTP/1.1, access log off, {} workers.",
            Nginx::version(binary),
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        ),
        None => println!("nginx is not installed: no nginx column."),
    }
    // CPU time per request of the proxy's processes (the guest's is in this process):
    // unlike throughput, it does not depend on how the two cores were shared out.
    let activator_pids = vec![activator.pid()];
    let nginx_pids = nginx.as_ref().map(Nginx::pids).unwrap_or_default();
    println!("\n| concurrency | target | req/s | p50 µs | p99 µs | errors | CPU µs per request |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for (round, concurrency) in [1usize, 16, 64].into_iter().enumerate() {
        let mut targets: Vec<(&str, &str)> = vec![("direct", &direct_url), ("activator", &activator_url)];
        if let Some(url) = &nginx_url {
            targets.push(("nginx", url));
        }
        // Rotate the order so drift on the machine does not always favour one target.
        let shift = round % targets.len();
        targets.rotate_left(shift);
        let mut results: Vec<(&str, LoadResult, Option<f64>)> = Vec::new();
        for (name, url) in targets {
            let pids: &[u32] = match name {
                "activator" => &activator_pids,
                "nginx" => &nginx_pids,
                _ => &[],
            };
            let before = cpu_time(pids);
            let result = generator.run(url, concurrency, duration).await;
            let used = cpu_time(pids).saturating_sub(before);
            let per_request =
                (!pids.is_empty() && result.requests > 0).then(|| used.as_secs_f64() * 1e6 / result.requests as f64);
            results.push((name, result, per_request));
        }
        results.sort_by_key(|(name, _, _)| match *name {
            "direct" => 0,
            "nginx" => 1,
            _ => 2,
        });
        for (name, r, cpu) in &results {
            println!(
                "| {concurrency} | {name} | {:.0} | {} | {} | {} | {} |",
                r.rps,
                us(r.p50),
                us(r.p99),
                r.errors,
                cpu.map_or_else(|| "–".into(), |c| format!("{c:.1}"))
            );
        }
        let get = |name: &str| results.iter().find(|(n, _, _)| *n == name).map(|(_, r, _)| *r);
        let cpu = |name: &str| results.iter().find(|(n, _, _)| *n == name).and_then(|(_, _, c)| *c);
        let cpu_ratio = cpu("activator").zip(cpu("nginx")).map(|(a, n)| a / n);
        ratios.push((
            concurrency,
            get("direct").unwrap_or_default(),
            get("activator").unwrap_or_default(),
            get("nginx"),
            cpu_ratio,
        ));
    }
    println!("\n| concurrency | throughput activator/direct | throughput activator/nginx | added p50 µs (activator − direct) | added p50 µs (nginx − direct) | CPU per request activator/nginx |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (concurrency, direct, through, nginx, cpu_ratio) in &ratios {
        println!(
            "| {concurrency} | {:.2} | {} | {} | {} | {} |",
            through.rps / direct.rps,
            nginx
                .map(|n| format!("{:.2}", through.rps / n.rps))
                .unwrap_or_else(|| "–".into()),
            us(through.p50.saturating_sub(direct.p50)),
            nginx
                .map(|n| us(n.p50.saturating_sub(direct.p50)))
                .unwrap_or_else(|| "–".into()),
            cpu_ratio.map_or_else(|| "–".into(), |r| format!("{r:.2}")),
        );
    }
    if nginx.is_some() {
        let worst = ratios
            .iter()
            .filter_map(|(c, _, a, n, _)| Some((*c, a.rps / n.as_ref()?.rps)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("ratios");
        target(
            "warm throughput activator ≥ nginx proxy_pass",
            format!("activator/nginx ≥ {:.2} (lowest at concurrency {})", worst.1, worst.0),
            worst.1 >= 1.0,
        );
    }
    let (_, direct, through, _, _) = ratios[0];
    let added = through.p50.saturating_sub(direct.p50);
    target(
        "added p50 latency ≤ 50 µs",
        format!("{} µs at concurrency 1", us(added)),
        added <= Duration::from_micros(50),
    );
}

fn humantime(d: Duration) -> String {
    format!("{} s", d.as_secs())
}
