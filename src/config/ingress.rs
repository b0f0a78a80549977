//! The ingress section: listener limits, and who may deliver (auth).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::human_duration;

/// Ingress limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Largest request body in bytes, enforced while reading (→ 413). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Most requests handled at once by the ingress listener (further wait). Default 10000.
    pub max_concurrent_requests: usize,
    /// How long a client may take to send its request headers. Default 10s.
    #[serde(with = "human_duration")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send its body once its headers came (→ 408
    /// `body_timeout`): a sender that never finishes its body holds a connection and a
    /// request slot no longer than this. Default 15s.
    #[serde(with = "human_duration")]
    pub body_read_timeout: Duration,
    /// `Retry-After` seconds sent with every 503. Default 1.
    pub retry_after_seconds: u32,
    /// Largest request head (request line + headers) in bytes (larger → 431). Default 64 KiB.
    pub max_header_bytes: usize,
    /// Most connections open at once (further ones wait to be accepted). Default 20000.
    pub max_connections: usize,
    /// Connections the kernel queues for `accept` on each listener (`listen(2)`'s backlog;
    /// Linux caps it at `net.core.somaxconn`). A burst of new connections beyond it has its
    /// SYNs dropped and retried by the senders after 1, 3, 7… s. Default 4096.
    pub listen_backlog: u32,
    /// Threads serving the ingress's connections, each a single-threaded runtime that
    /// serves the connections it is handed from start to end; 0 (the default) means one
    /// per CPU core. At most 256.
    pub worker_threads: usize,
    /// Who may deliver events.
    pub auth: AuthConfig,
    /// CloudEvent types that pre-warm the VM instead of being delivered: answered 202
    /// (`{"prewarm": true, "state": …}`) once its start is issued. Default
    /// `["io.vm-activator.prewarm"]`; empty turns pre-warming off.
    pub prewarm_types: Vec<String>,
}

/// The CloudEvent type that pre-warms a VM by default.
pub const PREWARM_TYPE: &str = "io.vm-activator.prewarm";

/// Ingress authentication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anyone who can connect may deliver (and so start VMs).
    None,
    /// Static tokens from a file.
    Bearer,
    /// Knative Eventing OIDC sink authentication.
    Oidc,
}

/// Ingress authentication and authorization.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `none`, `bearer` or `oidc`. Unset means `none` only for the local QEMU backend
    /// listening on loopback; anywhere else it must be chosen explicitly.
    pub mode: Option<AuthMode>,
    /// Bearer mode: file of tokens (one per line, `#` comments), re-read when it changes.
    pub bearer_tokens_file: Option<PathBuf>,
    /// OIDC mode settings.
    pub oidc: OidcConfig,
    /// OIDC subjects (`sub`) allowed to deliver to any VM (`*` suffix wildcard); empty =
    /// any valid token. VMs can narrow it with `vm-activator.io/allowed-subjects`.
    pub allowed_subjects: Vec<String>,
}

impl AuthConfig {
    /// The effective mode (validation has ruled out an unset mode where it is not allowed).
    pub fn mode(&self) -> AuthMode {
        self.mode.unwrap_or(AuthMode::None)
    }
}

/// OIDC (Knative sink authentication) settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OidcConfig {
    /// Required `iss`; keys are discovered from `<issuer>/.well-known/openid-configuration`.
    pub issuer: Option<String>,
    /// Required `aud`.
    pub audience: Option<String>,
    /// JWKS URL, instead of discovery.
    pub jwks_url: Option<String>,
    /// Clock leeway for `exp`/`nbf`. Default 30s.
    #[serde(with = "human_duration")]
    pub leeway: Duration,
    /// An unknown `kid` refetches the keys at most this often. Default 10s.
    #[serde(with = "human_duration")]
    pub jwks_min_refresh: Duration,
    /// CA for the issuer's TLS (default: the in-cluster CA when the issuer is the cluster's).
    pub ca_file: Option<PathBuf>,
    /// Bearer token for fetching keys (default: the pod's service-account token when the
    /// issuer is the cluster's).
    pub token_file: Option<PathBuf>,
}

impl Default for OidcConfig {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            jwks_url: None,
            leeway: Duration::from_secs(30),
            jwks_min_refresh: Duration::from_secs(10),
            ca_file: None,
            token_file: None,
        }
    }
}

impl Default for IngressConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_concurrent_requests: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(15),
            retry_after_seconds: 1,
            max_header_bytes: 64 * 1024,
            max_connections: 20_000,
            listen_backlog: 4096,
            worker_threads: 0,
            auth: AuthConfig::default(),
            prewarm_types: vec![PREWARM_TYPE.to_string()],
        }
    }
}
