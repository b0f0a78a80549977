//! Warm path: one load generator against (a) the guest server directly, (b) the real
//! `vm-activator` binary (KubeVirt backend, fake API server) in front of it, (c) nginx
//! `proxy_pass` with keep-alive upstreams in front of it — same guest, same run, one
//! target at a time. A full run measures each concurrency level in three rounds (the
//! order rotated per round), and the throughput target is judged on the median of the
//! rounds' activator/nginx ratios, each pair measured back to back: on a shared machine
//! one 5 s cell moves by ±15 % between runs.

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

/// Rounds per concurrency level in a full run (one in a quick run).
const ROUNDS: usize = 3;

/// Direct vs activator vs nginx at concurrency 1, 16 and 64, in [`ROUNDS`] rounds.
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

    let rounds = if mode.quick { 1 } else { ROUNDS };
    println!(
        "\n## Warm path: requests/s and latency, {} per cell, {rounds} round(s)\n",
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
    println!("Each target's row is its median round by requests/s; errors are those of all rounds.");
    println!("\n| concurrency | target | req/s | p50 µs | p99 µs | errors | CPU µs per request |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    let mut per_round: Vec<(usize, Vec<f64>)> = Vec::new();
    for (level, concurrency) in [1usize, 16, 64].into_iter().enumerate() {
        let mut names: Vec<(&str, &str)> = vec![("direct", &direct_url), ("activator", &activator_url)];
        if let Some(url) = &nginx_url {
            names.push(("nginx", url));
        }
        // Each round runs every target once, back to back; the order rotates per round
        // and per level so drift on the machine does not always favour one target.
        let mut rounds_run: Vec<Vec<(&str, LoadResult, Option<f64>)>> = Vec::new();
        for round in 0..rounds {
            let mut order = names.clone();
            order.rotate_left((level + round) % names.len());
            let mut results = Vec::new();
            for (name, url) in order {
                let pids: &[u32] = match name {
                    "activator" => &activator_pids,
                    "nginx" => &nginx_pids,
                    _ => &[],
                };
                let before = cpu_time(pids);
                let result = generator.run(url, concurrency, duration).await;
                let used = cpu_time(pids).saturating_sub(before);
                let per_request = (!pids.is_empty() && result.requests > 0)
                    .then(|| used.as_secs_f64() * 1e6 / result.requests as f64);
                results.push((name, result, per_request));
            }
            rounds_run.push(results);
        }
        let find = |round: &[(&str, LoadResult, Option<f64>)], name: &str| {
            round.iter().find(|(n, _, _)| *n == name).map(|(_, r, c)| (*r, *c))
        };
        // A target's row: its median round (by requests/s).
        let median_of = |name: &str| {
            let mut runs: Vec<(LoadResult, Option<f64>)> = rounds_run.iter().filter_map(|r| find(r, name)).collect();
            runs.sort_by(|a, b| a.0.rps.total_cmp(&b.0.rps));
            runs.get(runs.len() / 2).copied()
        };
        for name in ["direct", "nginx", "activator"] {
            if let Some((r, cpu)) = median_of(name) {
                // Errors of every round, not only the median one's.
                let errors: u64 = rounds_run
                    .iter()
                    .filter_map(|r| find(r, name))
                    .map(|(r, _)| r.errors)
                    .sum();
                println!(
                    "| {concurrency} | {name} | {:.0} | {} | {} | {errors} | {} |",
                    r.rps,
                    us(r.p50),
                    us(r.p99),
                    cpu.map_or_else(|| "–".into(), |c| format!("{c:.1}"))
                );
            }
        }
        // The throughput ratio of each round: activator and nginx measured minutes
        // apart would compare the machine's moods, not the proxies.
        let round_ratios: Vec<f64> = rounds_run
            .iter()
            .filter_map(|r| Some(find(r, "activator")?.0.rps / find(r, "nginx")?.0.rps))
            .collect();
        per_round.push((concurrency, round_ratios));
        let cpu = |name: &str| median_of(name).and_then(|(_, c)| c);
        let cpu_ratio = cpu("activator").zip(cpu("nginx")).map(|(a, n)| a / n);
        ratios.push((
            concurrency,
            median_of("direct").map(|(r, _)| r).unwrap_or_default(),
            median_of("activator").map(|(r, _)| r).unwrap_or_default(),
            median_of("nginx").map(|(r, _)| r),
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
        println!("\nThroughput activator/nginx in each round (each pair measured back to back), and their median:\n");
        println!("| concurrency | rounds | median |");
        println!("|---:|---|---:|");
        let mut medians = Vec::new();
        for (concurrency, round_ratios) in &per_round {
            let mut sorted = round_ratios.clone();
            sorted.sort_by(f64::total_cmp);
            let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
            let each: Vec<String> = round_ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!("| {concurrency} | {} | {median:.2} |", each.join(" / "));
            medians.push((*concurrency, median));
        }
        let worst = medians
            .iter()
            .copied()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("ratios");
        target(
            "warm throughput activator ≥ nginx proxy_pass",
            format!(
                "activator/nginx ≥ {:.2} ({}; lowest at concurrency {})",
                worst.1,
                if rounds == 1 {
                    "one round".to_string()
                } else {
                    format!("median of {rounds} rounds")
                },
                worst.0
            ),
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
