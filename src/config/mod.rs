//! Configuration: a YAML file, overridden by environment variables and command-line
//! flags (clap), typed and validated at start-up with errors that name the field.
//! Each module receives only its own section.
//!
//! This file has the whole configuration and the small sections; `cli.rs` the flags,
//! `ingress.rs` the ingress and auth sections, `idle.rs` the idle policies, `backends.rs` the backends' sections and
//! the local VMs, `validate.rs` the checks, `human_duration.rs` the duration syntax.
//!
//! Owns: parsing, defaults, validation, and the one place where bounds are stated.
//! Must not import anything but `vm` and the pure `idle_policy`.

mod backends;
mod cli;
pub mod human_duration;
mod idle;
mod ingress;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use backends::{Accel, KubevirtConfig, MachineConfig, QemuConfig, ScaleKind, VmConfig};
pub use cli::{Cli, LogFormat};
pub use idle::{AdaptiveConfig, IdleConfig};
pub use ingress::{AuthConfig, AuthMode, IngressConfig, OidcConfig};
pub use validate::is_dns_label;

/// Why a configuration could not be used. Every variant names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema (unknown key, wrong type, ...).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid config: {field}: {message}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `vms[0].max_buffered`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The whole configuration. Bounds are documented on each field and in `config/`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Ingress listener.
    pub listen: SocketAddr,
    /// Admin listener; keep it inside the cluster (it exposes VM names and metrics).
    pub admin_listen: SocketAddr,
    /// On SIGTERM: how long in-flight and held requests may take before exit.
    #[serde(with = "human_duration")]
    pub drain_timeout: Duration,
    /// Which backend runs the VMs.
    pub backend: BackendKind,
    /// Limits of the ingress listener.
    pub ingress: IngressConfig,
    /// The pooled HTTP client to guests.
    pub proxy: ProxyConfig,
    /// Guest readiness probing.
    pub readiness: ReadinessConfig,
    /// The idle scaler.
    pub idle: IdleConfig,
    /// The local QEMU backend.
    pub qemu: QemuConfig,
    /// The KubeVirt backend.
    pub kubevirt: KubevirtConfig,
    /// The VMs of the local QEMU backend (the KubeVirt backend discovers its VMs).
    pub vms: Vec<VmConfig>,
    /// Who may use the admin listener's verbs (start, stop, pause, hibernate).
    pub admin: AdminConfig,
}

/// How callers of the admin verbs are authenticated and authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerbAuthMode {
    /// Anyone who reaches the admin listener.
    None,
    /// A token from `admin.bearer_tokens_file`.
    Bearer,
    /// The Kubernetes API server decides: TokenReview of the caller's token, then a
    /// SubjectAccessReview for the permission `virtctl` needs for the same action.
    Kubernetes,
}

/// The admin section.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `none`, `bearer` or `kubernetes`. Unset: `kubernetes` with the kubevirt backend;
    /// with the qemu backend `none` when `admin_listen` is loopback, else it must be set.
    pub verbs_auth: Option<VerbAuthMode>,
    /// Bearer mode: file of tokens (one per line, `#` comments), re-read when it changes.
    pub bearer_tokens_file: Option<PathBuf>,
}

impl Config {
    /// The effective admin verb authentication (validation ruled out an unset mode
    /// where there is no default).
    pub fn verbs_auth(&self) -> VerbAuthMode {
        self.admin.verbs_auth.unwrap_or(match self.backend {
            BackendKind::Kubevirt => VerbAuthMode::Kubernetes,
            BackendKind::Qemu => VerbAuthMode::None,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("literal address"),
            admin_listen: "0.0.0.0:9090".parse().expect("literal address"),
            drain_timeout: Duration::from_secs(30),
            backend: BackendKind::Qemu,
            ingress: IngressConfig::default(),
            proxy: ProxyConfig::default(),
            readiness: ReadinessConfig::default(),
            idle: IdleConfig::default(),
            qemu: QemuConfig::default(),
            kubevirt: KubevirtConfig::default(),
            vms: Vec::new(),
            admin: AdminConfig::default(),
        }
    }
}

/// Which backend runs the VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Local QEMU processes launched by the activator (the embedded default).
    #[default]
    Qemu,
    /// KubeVirt VirtualMachines through the Kubernetes API.
    Kubevirt,
}

/// The pooled client that forwards to guests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// TCP connect timeout to a guest. Default 2s.
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long. Default 90s.
    #[serde(with = "human_duration")]
    pub pool_idle_timeout: Duration,
    /// At most this many idle connections kept per guest. Default 256.
    pub pool_max_idle_per_host: usize,
    /// A guest's response body may be at most this large: a larger `Content-Length` is
    /// answered 502 `guest_response_too_large`, a streamed body is cut off there (the
    /// sender's response ends early). Default 8 MiB.
    pub max_response_body_bytes: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            max_response_body_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Guest readiness probing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadinessConfig {
    /// Pause between two probe attempts. Default 5ms: cold-start overhead is bounded by it.
    #[serde(with = "human_duration")]
    pub interval: Duration,
    /// Timeout of one probe attempt. Default 500ms.
    #[serde(with = "human_duration")]
    pub attempt_timeout: Duration,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(5),
            attempt_timeout: Duration::from_millis(500),
        }
    }
}

impl Config {
    /// Parses a YAML file; relative machine paths are resolved against its directory.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::from_yaml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for vm in &mut config.vms {
            vm.machine.kernel = base.join(&vm.machine.kernel);
            vm.machine.initrd = base.join(&vm.machine.initrd);
        }
        Ok(config)
    }

    /// Parses YAML text (no path resolution, no validation).
    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_norway::from_str(text).map_err(|e| e.to_string())
    }

    /// A configuration for tests: loopback listeners on free ports, fast probing.
    pub fn for_tests() -> Config {
        Config {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            admin_listen: "127.0.0.1:0".parse().expect("literal address"),
            drain_timeout: Duration::from_secs(5),
            readiness: ReadinessConfig {
                interval: Duration::from_millis(2),
                attempt_timeout: Duration::from_millis(200),
            },
            idle: IdleConfig {
                check_interval: Duration::from_millis(50),
                ..IdleConfig::default()
            },
            ..Config::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Policy;

    /// A valid file with one local VM, for tests to vary.
    pub(super) const VM: &str = "
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:9090
vms:
  - namespace: default
    name: demo
    idle_timeout: 30s
    max_buffered: 1000
    machine:
      kernel: k
      initrd: i
";

    #[test]
    fn parses_human_durations_and_per_vm_overrides() {
        let config = Config::from_yaml(VM).unwrap();
        config.validate().unwrap();
        let policy = config.vms[0].policy();
        assert_eq!(policy.idle_timeout, Duration::from_secs(30));
        assert_eq!(policy.max_buffered, 1000);
        assert_eq!(policy.port, 8080);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_yaml("admin_listen: 127.0.0.1:1\nlisten_port: 3\n").unwrap_err();
        assert!(err.contains("listen_port"), "{err}");
        let err = Config::from_yaml(&VM.replace("max_buffered", "max_bufferd")).unwrap_err();
        assert!(err.contains("max_bufferd"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_value() {
        let err = Config::from_yaml(&VM.replace("30s", "thirty")).unwrap_err();
        assert!(err.contains("thirty"), "{err}");
    }

    #[test]
    fn the_shipped_config_files_parse_and_validate() {
        for file in ["config/local.yaml", "config/reference.yaml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let mut config = Config::from_file(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            if file.ends_with("reference.yaml") {
                // The defaults listen on every interface, where an auth mode must be chosen
                // for the ingress and for the admin verbs.
                let err = config.validate().unwrap_err().to_string();
                assert!(err.contains("ingress.auth.mode"), "{err}");
                config.ingress.auth.mode = Some(AuthMode::None);
                let err = config.validate().unwrap_err().to_string();
                assert!(err.contains("admin.verbs_auth"), "{err}");
                config.admin.verbs_auth = Some(VerbAuthMode::None);
            }
            config.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        let reference =
            Config::from_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/reference.yaml")).unwrap();
        let defaults = Config::default();
        assert_eq!(reference.ingress.max_body_bytes, defaults.ingress.max_body_bytes);
        assert_eq!(reference.readiness.interval, defaults.readiness.interval);
        assert_eq!(reference.drain_timeout, defaults.drain_timeout);
        assert_eq!(
            reference.vms[0].policy(),
            Policy::default(),
            "reference.yaml documents the defaults"
        );
    }
}
