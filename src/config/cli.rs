//! Command-line flags (clap), each also read from an environment variable, and how
//! they override the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::{AuthMode, BackendKind, Config, ConfigError};

/// Command-line flags. Each flag also reads an environment variable; flags and
/// variables override the file.
#[derive(Debug, Parser, Default)]
#[command(
    name = "vm-activator",
    version,
    about = "Scale-to-zero for virtual machines, driven by CloudEvents"
)]
pub struct Cli {
    /// YAML configuration file.
    #[arg(long, env = "VM_ACTIVATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Ingress listener (CloudEvents in). Default 0.0.0.0:8080.
    #[arg(long, env = "VM_ACTIVATOR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin listener (/metrics, /healthz, /readyz, /v1/vms). Default 0.0.0.0:9090.
    #[arg(long, env = "VM_ACTIVATOR_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// How long SIGTERM waits for in-flight and held requests (e.g. `30s`).
    #[arg(long, env = "VM_ACTIVATOR_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Largest accepted request body in bytes (larger → 413).
    #[arg(long, env = "VM_ACTIVATOR_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Threads serving ingress connections (0: one per CPU core); match it to the CPU
    /// limit of the activator's container.
    #[arg(long, env = "VM_ACTIVATOR_INGRESS_WORKER_THREADS")]
    pub ingress_worker_threads: Option<usize>,
    /// Ingress authentication: `none`, `bearer` or `oidc` (Knative sink auth).
    #[arg(long, env = "VM_ACTIVATOR_AUTH")]
    pub auth: Option<AuthMode>,
    /// Bearer mode: file of accepted tokens (one per line, `#` comments).
    #[arg(long, env = "VM_ACTIVATOR_BEARER_TOKENS_FILE")]
    pub bearer_tokens_file: Option<PathBuf>,
    /// OIDC mode: the token issuer (`iss`), e.g. `https://kubernetes.default.svc.cluster.local`.
    #[arg(long, env = "VM_ACTIVATOR_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,
    /// OIDC mode: the audience (`aud`) tokens must be for.
    #[arg(long, env = "VM_ACTIVATOR_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// OIDC mode: JWKS URL (default: discovered from the issuer).
    #[arg(long, env = "VM_ACTIVATOR_OIDC_JWKS_URL")]
    pub oidc_jwks_url: Option<String>,
    /// Subjects allowed to deliver (comma-separated; `*` suffix wildcard).
    #[arg(long, env = "VM_ACTIVATOR_ALLOWED_SUBJECTS", value_delimiter = ',')]
    pub allowed_subjects: Option<Vec<String>>,
    /// Which backend runs the VMs: `qemu` (local processes) or `kubevirt`.
    #[arg(long, env = "VM_ACTIVATOR_BACKEND")]
    pub backend: Option<BackendKind>,
    /// Kubeconfig for the KubeVirt backend (default: `KUBECONFIG`, `~/.kube/config`, or
    /// the in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "VM_ACTIVATOR_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s or 10m: {e}"))
}

impl Config {
    /// Reads the file named by `--config` (if any), applies flags and environment, validates.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = cli.listen {
            config.listen = listen;
        }
        if let Some(admin) = cli.admin_listen {
            config.admin_listen = admin;
        }
        if let Some(drain) = cli.drain_timeout {
            config.drain_timeout = drain;
        }
        if let Some(max) = cli.max_body_bytes {
            config.ingress.max_body_bytes = max;
        }
        if let Some(threads) = cli.ingress_worker_threads {
            config.ingress.worker_threads = threads;
        }
        if let Some(backend) = cli.backend {
            config.backend = backend;
        }
        let auth = &mut config.ingress.auth;
        if let Some(mode) = cli.auth {
            auth.mode = Some(mode);
        }
        if let Some(file) = &cli.bearer_tokens_file {
            auth.bearer_tokens_file = Some(file.clone());
        }
        if let Some(issuer) = &cli.oidc_issuer {
            auth.oidc.issuer = Some(issuer.clone());
        }
        if let Some(audience) = &cli.oidc_audience {
            auth.oidc.audience = Some(audience.clone());
        }
        if let Some(url) = &cli.oidc_jwks_url {
            auth.oidc.jwks_url = Some(url.clone());
        }
        if let Some(subjects) = &cli.allowed_subjects {
            auth.allowed_subjects = subjects
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(kubeconfig) = &cli.kubeconfig {
            config.kubevirt.kubeconfig = Some(kubeconfig.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::VM;

    #[test]
    fn cli_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, VM.replace("127.0.0.1:8080", "127.0.0.1:1111")).unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            listen: Some("127.0.0.1:2222".parse().unwrap()),
            ..Cli::default()
        };
        let config = Config::load(&cli).unwrap();
        assert_eq!(config.listen.port(), 2222);
        assert_eq!(config.vms[0].machine.kernel, dir.path().join("k"));
    }
}
