//! The warm-path load generator: wrk (Debian's `wrk`, closed loop, keep-alive, one
//! thread, C connections) when installed, else a closed loop of pooled hyper clients in
//! this process. The same generator drives every target of one run.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

/// The event every warm-path request carries (binary mode).
const BODY: &str = r#"{"reading":42}"#;

/// What one load run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadResult {
    /// Completed 2xx requests per second.
    pub rps: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
    /// Requests answered, whatever the status.
    pub requests: u64,
}

/// Which generator runs.
pub enum Generator {
    /// wrk at this path, with its Lua request script.
    Wrk { binary: PathBuf, script: PathBuf },
    /// In-process hyper clients.
    Hyper,
}

impl Generator {
    /// wrk if installed (and `BENCH_LOADGEN` is not `hyper`), else hyper.
    pub fn detect(dir: &std::path::Path) -> Generator {
        let wrk = ["/usr/bin/wrk", "/usr/local/bin/wrk"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        match wrk {
            Some(binary) if std::env::var("BENCH_LOADGEN").as_deref() != Ok("hyper") => {
                let script = dir.join("event.lua");
                let lua = format!(
                    "wrk.method = \"POST\"\nwrk.body = '{BODY}'\n\
                     wrk.headers[\"Content-Type\"] = \"application/json\"\n\
                     wrk.headers[\"ce-specversion\"] = \"1.0\"\n\
                     wrk.headers[\"ce-id\"] = \"bench-1\"\n\
                     wrk.headers[\"ce-source\"] = \"/bench\"\n\
                     wrk.headers[\"ce-type\"] = \"bench.event\"\n"
                );
                std::fs::write(&script, lua).expect("write wrk script");
                Generator::Wrk { binary, script }
            }
            _ => Generator::Hyper,
        }
    }

    /// How the table names it.
    pub fn describe(&self) -> String {
        match self {
            Generator::Wrk { binary, .. } => {
                let version = std::process::Command::new(binary)
                    .arg("-v")
                    .output()
                    .map(|o| {
                        let text =
                            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
                        text.split_whitespace().nth(1).unwrap_or("").to_string()
                    })
                    .unwrap_or_default();
                format!("wrk {version} (1 thread, keep-alive, closed loop)")
            }
            Generator::Hyper => "in-process hyper client (wrk not installed)".to_string(),
        }
    }

    /// `concurrency` connections POST the event to `url` for `duration`.
    pub async fn run(&self, url: &str, concurrency: usize, duration: Duration) -> LoadResult {
        match self {
            Generator::Wrk { binary, script } => wrk(binary, script, url, concurrency, duration).await,
            Generator::Hyper => hyper_load(url, concurrency, duration).await,
        }
    }
}

async fn wrk(binary: &PathBuf, script: &PathBuf, url: &str, concurrency: usize, duration: Duration) -> LoadResult {
    let output = tokio::process::Command::new(binary)
        .args(["-t1", "--latency", "--timeout", "10s"])
        .arg(format!("-c{concurrency}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .await
        .expect("wrk runs");
    let text = String::from_utf8_lossy(&output.stdout);
    parse_wrk(&text).unwrap_or_else(|| panic!("unexpected wrk output:\n{text}"))
}

/// Parses wrk's `--latency` report.
fn parse_wrk(text: &str) -> Option<LoadResult> {
    let duration = |s: &str| -> Option<Duration> {
        let (number, scale) = if let Some(v) = s.strip_suffix("us") {
            (v, 1e-6)
        } else if let Some(v) = s.strip_suffix("ms") {
            (v, 1e-3)
        } else if let Some(v) = s.strip_suffix('s') {
            (v, 1.0)
        } else {
            return None;
        };
        Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
    };
    let mut result = LoadResult::default();
    let mut total = 0u64;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => result.p50 = duration(v)?,
            ["99%", v] => result.p99 = duration(v)?,
            ["Requests/sec:", v] => result.rps = v.parse().ok()?,
            [n, "requests", "in", ..] => total = n.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => result.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                result.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    result.requests = total;
    // wrk's Requests/sec counts every answer; report 2xx only.
    if total > 0 {
        result.rps *= total.saturating_sub(result.errors) as f64 / total as f64;
    }
    (result.rps > 0.0).then_some(result)
}

async fn hyper_load(url: &str, concurrency: usize, duration: Duration) -> LoadResult {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.to_string());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let request = hyper::Request::post(&url)
                    .header("ce-specversion", "1.0")
                    .header("ce-id", "bench-1")
                    .header("ce-source", "/bench")
                    .header("ce-type", "bench.event")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(BODY.as_bytes())))
                    .expect("valid request");
                let t = Instant::now();
                match client.request(request).await {
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
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for worker in workers {
        let (l, e) = worker.await.expect("worker");
        latencies.extend(l);
        errors += e;
    }
    latencies.sort();
    LoadResult {
        requests: latencies.len() as u64 + errors,
        rps: latencies.len() as f64 / started.elapsed().as_secs_f64(),
        p50: crate::report::percentile(&latencies, 0.5),
        p99: crate::report::percentile(&latencies, 0.99),
        errors,
    }
}
