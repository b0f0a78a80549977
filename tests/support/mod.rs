//! Test support: an activator on loopback over the fake backend, a real HTTP client,
//! and helpers to send CloudEvents and read the admin API.
#![allow(dead_code)]

pub mod binary;
#[cfg(feature = "kubevirt")]
pub mod kube;
pub mod oidc;
#[cfg(feature = "kubevirt")]
pub mod real_kube;

use std::sync::Arc;
use std::time::Duration;

use vm_activator::backend::fake::{FakeBackend, FakeOptions};
use vm_activator::config::Config;
use vm_activator::server::{self, Server};
use vm_activator::vm::{Policy, VmKey};

/// A running activator over a fake backend.
pub struct Harness {
    pub server: Server,
    pub backend: Arc<FakeBackend>,
    pub client: reqwest::Client,
    pub ingress: String,
    pub admin: String,
}

/// The VM most tests use.
pub fn demo() -> VmKey {
    VmKey::new("default", "demo")
}

/// A policy suited to tests: fast timeouts, HTTP readiness on /healthz.
pub fn policy() -> Policy {
    Policy {
        idle_timeout: Duration::from_secs(60),
        start_timeout: Duration::from_secs(10),
        readiness: "http:/healthz".parse().unwrap(),
        request_timeout: Duration::from_secs(5),
        ..Policy::default()
    }
}

impl Harness {
    /// One VM `default/demo` with `policy`, fake VMs behaving as `options`.
    pub async fn start(policy: Policy, options: FakeOptions) -> Harness {
        Self::start_with(vec![(demo(), policy)], options, Config::for_tests()).await
    }

    /// Any VMs and config.
    pub async fn start_with(vms: Vec<(VmKey, Policy)>, options: FakeOptions, config: Config) -> Harness {
        let backend = FakeBackend::new(vms, options);
        let server = server::start(config, backend.clone()).await.expect("server starts");
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Harness {
            ingress: format!("http://{}", server.ingress_addr),
            admin: format!("http://{}", server.admin_addr),
            server,
            backend,
            client,
        }
    }

    /// POSTs a valid binary-mode CloudEvent with `id` to `path` (e.g. `/default/demo`).
    pub async fn send(&self, path: &str, id: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.ingress))
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/tests")
            .header("ce-type", "test.event")
            .header("content-type", "application/json")
            .body(format!("{{\"n\":\"{id}\"}}"))
            .send()
            .await
            .expect("request completes")
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        admin_text(&self.client, &self.admin, "/metrics").await
    }

    /// The value of one exact series in `/metrics`, or 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// `/v1/vms` as JSON.
    pub async fn vms(&self) -> serde_json::Value {
        serde_json::from_str(&admin_text(&self.client, &self.admin, "/v1/vms").await).unwrap()
    }

    /// Whether the admin listener still answers `/healthz` with 200.
    pub async fn healthy(&self) -> bool {
        let response = self.client.get(format!("{}/healthz", self.admin)).send().await;
        response.is_ok_and(|r| r.status() == 200)
    }

    /// The `state` of `default/demo` in `/v1/vms`.
    pub async fn demo_state(&self) -> String {
        self.vms().await[0]["state"].as_str().unwrap().to_string()
    }

    /// Polls `/v1/vms` until `default/demo` is in `state`, or panics after `limit`.
    pub async fn wait_state(&self, state: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = self.demo_state().await;
            if now == state {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "VM stayed {now}, expected {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The body of `GET {admin}{path}` as text (panics if the admin listener does not answer).
pub async fn admin_text(client: &reqwest::Client, admin: &str, path: &str) -> String {
    client
        .get(format!("{admin}{path}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one exact series (`name{labels}`) in Prometheus text, or 0 if absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// POSTs a minimal binary-mode CloudEvent with `id` to `url`; returns the status, or 0
/// if no answer came (connection refused or reset).
pub async fn post_event(client: &reqwest::Client, url: &str, id: &str) -> u16 {
    client
        .post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/tests")
        .header("ce-type", "test.event")
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Sends `request` bytes as-is (no client-side path normalisation) and returns the
/// status code of the answer.
pub async fn raw_status(addr: std::net::SocketAddr, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}
