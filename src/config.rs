//! Configuration: a YAML file, overridden by environment variables and command-line
//! flags (clap), typed and validated at start-up with errors that name the field.
//! Each module receives only its own section.
//!
//! Owns: parsing, defaults, validation, and the one place where bounds are stated.
//! Must not import anything but `vm`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::vm::{Policy, Readiness, ScaleDown, VmKey};

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
    /// Ingress authentication: `none`, `bearer` or `oidc` (Knative sink auth).
    #[arg(long, env = "VM_ACTIVATOR_AUTH")]
    pub auth: Option<AuthMode>,
    /// Bearer mode: file of accepted tokens (one per line, `#` comments).
    #[arg(long, env = "VM_ACTIVATOR_BEARER_TOKENS_FILE")]
    pub bearer_tokens_file: Option<PathBuf>,
    /// OIDC mode: the token issuer (`iss`), e.g. https://kubernetes.default.svc.cluster.local.
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

/// The KubeVirt backend.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct KubevirtConfig {
    /// Kubeconfig file; default: `KUBECONFIG`, `~/.kube/config`, or in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Only VMs in these namespaces; empty = every namespace (needs a ClusterRole).
    pub namespaces: Vec<String>,
    /// Scale down by pausing through `subresources.kubevirt.io` (needs the
    /// `virtualmachineinstances/pause` and `/unpause` RBAC verbs). Default false: a VM
    /// whose policy says pause is stopped instead.
    pub pause: bool,
}

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
    /// `Retry-After` seconds sent with every 503. Default 1.
    pub retry_after_seconds: u32,
    /// Largest request head (request line + headers) in bytes (larger → 431). Default 64 KiB.
    pub max_header_bytes: usize,
    /// Most connections open at once (further ones wait to be accepted). Default 20000.
    pub max_connections: usize,
    /// Who may deliver events.
    pub auth: AuthConfig,
}

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
            retry_after_seconds: 1,
            max_header_bytes: 64 * 1024,
            max_connections: 20_000,
            auth: AuthConfig::default(),
        }
    }
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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
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

/// The idle scaler.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleConfig {
    /// How often idleness is checked. Default 1s.
    #[serde(with = "human_duration")]
    pub check_interval: Duration,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(1),
        }
    }
}

/// Hardware acceleration for local QEMU guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the CPU has vmx/svm and /dev/kvm opens, otherwise TCG.
    #[default]
    Auto,
    /// Always KVM (fails to start without it).
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// The local QEMU backend.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The emulator binary.
    pub binary: PathBuf,
    /// Acceleration.
    pub accel: Accel,
    /// After QMP `system_powerdown`, wait this long before `quit`. Default 5s.
    #[serde(with = "human_duration")]
    pub stop_grace: Duration,
    /// Where QMP sockets and console logs go. Default: a directory under the system temp dir.
    pub run_dir: Option<PathBuf>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            stop_grace: Duration::from_secs(5),
            run_dir: None,
        }
    }
}

/// One VM of the local QEMU backend: identity, policy overrides and machine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Namespace part of the ingress path.
    pub namespace: String,
    /// Name part of the ingress path.
    pub name: String,
    /// Guest HTTP port. Default 8080.
    pub port: Option<u16>,
    /// Guest path prefix. Default `/`.
    pub path: Option<String>,
    /// Idle time before scale-down. Default 10m.
    #[serde(default, with = "human_duration::option")]
    pub idle_timeout: Option<Duration>,
    /// `stop`, `pause` or `pause-then-stop`. Default stop.
    pub scale_down: Option<ScaleDown>,
    /// Start call to Ready. Default 120s.
    #[serde(default, with = "human_duration::option")]
    pub start_timeout: Option<Duration>,
    /// Held requests while not Ready. Default 1000.
    pub max_buffered: Option<usize>,
    /// Held body bytes while not Ready. Default 64 MiB.
    pub max_buffered_bytes: Option<usize>,
    /// Requests in flight to the guest at once; 0 = unlimited. Default 0.
    pub concurrency: Option<usize>,
    /// `tcp`, `http` or `http:/path`. Default `http` (GET /).
    pub readiness: Option<Readiness>,
    /// Guest answer timeout per request (→ 504). Default 30s.
    #[serde(default, with = "human_duration::option")]
    pub request_timeout: Option<Duration>,
    /// OIDC subjects allowed to deliver to this VM (`*` suffix wildcard); empty = any
    /// subject the global list allows.
    #[serde(default)]
    pub allowed_subjects: Vec<String>,
    /// The machine to boot.
    pub machine: MachineConfig,
}

impl VmConfig {
    /// The VM's key.
    pub fn key(&self) -> VmKey {
        VmKey::new(&self.namespace, &self.name)
    }

    /// The effective policy: overrides on top of [`Policy::default`].
    pub fn policy(&self) -> Policy {
        let d = Policy::default();
        Policy {
            port: self.port.unwrap_or(d.port),
            path: self.path.clone().unwrap_or(d.path),
            idle_timeout: self.idle_timeout.unwrap_or(d.idle_timeout),
            scale_down: self.scale_down.unwrap_or(d.scale_down),
            start_timeout: self.start_timeout.unwrap_or(d.start_timeout),
            max_buffered: self.max_buffered.unwrap_or(d.max_buffered),
            max_buffered_bytes: self.max_buffered_bytes.unwrap_or(d.max_buffered_bytes),
            concurrency: self.concurrency.unwrap_or(d.concurrency),
            readiness: self.readiness.clone().unwrap_or(d.readiness),
            request_timeout: self.request_timeout.unwrap_or(d.request_timeout),
            allowed_subjects: self.allowed_subjects.clone(),
            warnings: Vec::new(),
        }
    }
}

/// What QEMU boots for one VM.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Kernel image (relative paths are relative to the config file's directory).
    pub kernel: PathBuf,
    /// Initramfs (relative paths are relative to the config file's directory).
    pub initrd: PathBuf,
    /// Kernel command line.
    #[serde(default = "default_append")]
    pub append: String,
    /// Guest memory in MiB. Default 256.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Virtual CPUs. Default 1.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
}

fn default_append() -> String {
    "console=ttyS0 quiet panic=-1".to_string()
}
fn default_memory() -> u32 {
    256
}
fn default_cpus() -> u32 {
    1
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

    /// Checks ranges and uniqueness; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ingress.max_body_bytes == 0 {
            return Err(invalid("ingress.max_body_bytes", "must be at least 1"));
        }
        if self.ingress.max_concurrent_requests == 0 {
            return Err(invalid("ingress.max_concurrent_requests", "must be at least 1"));
        }
        if self.ingress.max_header_bytes < 1024 {
            return Err(invalid("ingress.max_header_bytes", "must be at least 1024"));
        }
        if self.ingress.max_connections == 0 {
            return Err(invalid("ingress.max_connections", "must be at least 1"));
        }
        let auth = &self.ingress.auth;
        match auth.mode {
            None if !(self.backend == BackendKind::Qemu && self.listen.ip().is_loopback()) => {
                return Err(invalid(
                    "ingress.auth.mode",
                    "must be set (oidc, bearer, or none explicitly): anyone who can reach the ingress can start VMs; \
                     none is the default only for the local qemu backend listening on loopback",
                ))
            }
            Some(AuthMode::Bearer) if auth.bearer_tokens_file.is_none() => {
                return Err(invalid(
                    "ingress.auth.bearer_tokens_file",
                    "is required with mode bearer",
                ))
            }
            Some(AuthMode::Oidc) if auth.oidc.issuer.is_none() => {
                return Err(invalid("ingress.auth.oidc.issuer", "is required with mode oidc"))
            }
            Some(AuthMode::Oidc) if auth.oidc.audience.is_none() => {
                return Err(invalid("ingress.auth.oidc.audience", "is required with mode oidc"))
            }
            _ => {}
        }
        if !auth.allowed_subjects.is_empty() && auth.mode() != AuthMode::Oidc {
            return Err(invalid(
                "ingress.auth.allowed_subjects",
                "subjects come from OIDC tokens: needs mode oidc",
            ));
        }
        if self.readiness.interval.is_zero() {
            return Err(invalid("readiness.interval", "must be greater than 0"));
        }
        if self.readiness.attempt_timeout.is_zero() {
            return Err(invalid("readiness.attempt_timeout", "must be greater than 0"));
        }
        if self.idle.check_interval.is_zero() {
            return Err(invalid("idle.check_interval", "must be greater than 0"));
        }
        for (i, ns) in self.kubevirt.namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                return Err(invalid(format!("kubevirt.namespaces[{i}]"), "must be a DNS label"));
            }
        }
        if self.backend == BackendKind::Kubevirt && !self.vms.is_empty() {
            return Err(invalid(
                "vms",
                "the kubevirt backend discovers its VMs by label; configure them with annotations, not here",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, vm) in self.vms.iter().enumerate() {
            let field = |name: &str| format!("vms[{i}].{name}");
            if !is_dns_label(&vm.namespace) {
                return Err(invalid(field("namespace"), "must be a DNS label (a-z, 0-9, '-')"));
            }
            if !is_dns_label(&vm.name) {
                return Err(invalid(field("name"), "must be a DNS label (a-z, 0-9, '-')"));
            }
            if !seen.insert(vm.key()) {
                return Err(invalid(field("name"), format!("{} is listed twice", vm.key())));
            }
            let policy = vm.policy();
            if policy.port == 0 {
                return Err(invalid(field("port"), "must be 1-65535"));
            }
            if !policy.path.starts_with('/') {
                return Err(invalid(field("path"), "must start with '/'"));
            }
            if policy.idle_timeout.is_zero() {
                return Err(invalid(field("idle_timeout"), "must be greater than 0"));
            }
            if policy.start_timeout.is_zero() {
                return Err(invalid(field("start_timeout"), "must be greater than 0"));
            }
            if policy.request_timeout.is_zero() {
                return Err(invalid(field("request_timeout"), "must be greater than 0"));
            }
            if policy.max_buffered == 0 {
                return Err(invalid(field("max_buffered"), "must be at least 1"));
            }
            if policy.max_buffered_bytes < self.ingress.max_body_bytes {
                return Err(invalid(
                    field("max_buffered_bytes"),
                    "must be at least ingress.max_body_bytes, or no body could ever be held",
                ));
            }
            if self.backend == BackendKind::Qemu && policy.readiness == Readiness::Tcp {
                return Err(invalid(
                    field("readiness"),
                    "tcp cannot tell a booted guest from QEMU user networking, which accepts \
                     connections on the guest's behalf; use http or http:/path",
                ));
            }
            if vm.machine.memory_mib < 32 {
                return Err(invalid(field("machine.memory_mib"), "must be at least 32"));
            }
            if vm.machine.cpus == 0 {
                return Err(invalid(field("machine.cpus"), "must be at least 1"));
            }
        }
        Ok(())
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
            },
            ..Config::default()
        }
    }
}

/// Kubernetes object names in a path: RFC 1123 labels (what KubeVirt accepts for VM names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Serde adapter for human durations (`30s`, `10m`, `1h 30m`).
pub mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises as `humantime` text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Parses `humantime` text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like 30s or 10m: {e}")))
    }

    /// The same for optional fields.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Serialises `Some` as text and `None` as null.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Parses optional `humantime` text.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            match Option::<String>::deserialize(d)? {
                None => Ok(None),
                Some(text) => humantime::parse_duration(&text)
                    .map(Some)
                    .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like 30s or 10m: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "
listen: 127.0.0.1:8080
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
    fn validation_names_the_field() {
        let config = Config::from_yaml(&VM.replace("max_buffered: 1000", "max_buffered: 0")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("vms[0].max_buffered"), "{err}");
        let config = Config::from_yaml(&VM.replace("name: demo", "name: Demo_1")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("vms[0].name"), "{err}");
    }

    #[test]
    fn the_shipped_config_files_parse_and_validate() {
        for file in ["config/local.yaml", "config/reference.yaml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let mut config = Config::from_file(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            if file.ends_with("reference.yaml") {
                // The defaults listen on every interface, where an auth mode must be chosen.
                let err = config.validate().unwrap_err().to_string();
                assert!(err.contains("ingress.auth.mode"), "{err}");
                config.ingress.auth.mode = Some(AuthMode::None);
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

    #[test]
    fn auth_mode_rules() {
        let mut config = Config::from_yaml(VM).unwrap();
        config.listen = "127.0.0.1:8080".parse().unwrap();
        config.validate().expect("none is the default for qemu on loopback");
        config.listen = "0.0.0.0:8080".parse().unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("ingress.auth.mode"));
        config.ingress.auth.mode = Some(AuthMode::Oidc);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("ingress.auth.oidc.issuer"));
        config.ingress.auth.oidc.issuer = Some("https://issuer".into());
        config.ingress.auth.oidc.audience = Some("vm-activator".into());
        config.validate().unwrap();
        config.ingress.auth.mode = Some(AuthMode::Bearer);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bearer_tokens_file"));
        config.ingress.auth.mode = Some(AuthMode::None);
        config.ingress.auth.allowed_subjects = vec!["x".into()];
        assert!(config.validate().unwrap_err().to_string().contains("allowed_subjects"));
    }

    #[test]
    fn tcp_readiness_is_refused_for_qemu_vms() {
        let config =
            Config::from_yaml(&VM.replace("max_buffered: 1000", "max_buffered: 1000\n    readiness: tcp")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("vms[0].readiness"), "{err}");
    }

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
