//! Pure domain types shared by every layer: which VM ([`VmKey`]), where its guest
//! listens ([`Endpoint`]), what it is doing ([`VmPhase`]) and how it is to be run
//! ([`Policy`]).
//!
//! Owns: plain data and its parsing. Must not import any other module of this crate,
//! nor HTTP, Kubernetes or process APIs.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Identity of one virtual machine: `{namespace}/{name}`, as in the ingress path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmKey {
    /// Kubernetes namespace (or the namespace given in the local config).
    pub namespace: String,
    /// VM name within the namespace.
    pub name: String,
}

impl VmKey {
    /// Builds a key from its two parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for VmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where the guest application accepts HTTP: a socket address reachable from the activator.
pub type Endpoint = SocketAddr;

/// What a VM is doing, as seen by the activator. Published on the gate's watch channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// Not running; costs nothing. The next event starts it.
    Stopped,
    /// The backend has been asked to start (or resume) the VM; it is not running yet.
    Starting,
    /// The backend reports the VM running; the guest application has not answered yet.
    Probing,
    /// The guest application answered its probe: requests flow.
    Ready,
    /// The idle scaler closed the gate and asked the backend to stop or pause the VM.
    Stopping,
    /// Suspended in memory; resuming is much faster than a cold boot.
    Paused,
    /// The last start failed or timed out; the next event tries again.
    Failed,
}

impl VmPhase {
    /// Every phase, in the order used for the `vm_state` gauge.
    pub const ALL: [VmPhase; 7] = [
        VmPhase::Stopped,
        VmPhase::Starting,
        VmPhase::Probing,
        VmPhase::Ready,
        VmPhase::Stopping,
        VmPhase::Paused,
        VmPhase::Failed,
    ];

    /// The lowercase name used in metrics labels and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            VmPhase::Stopped => "stopped",
            VmPhase::Starting => "starting",
            VmPhase::Probing => "probing",
            VmPhase::Ready => "ready",
            VmPhase::Stopping => "stopping",
            VmPhase::Paused => "paused",
            VmPhase::Failed => "failed",
        }
    }
}

impl fmt::Display for VmPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the idle scaler does with an idle VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleDown {
    /// Power the VM off: no cost while idle, a full boot on the next event.
    #[default]
    Stop,
    /// Pause the VM in memory: keeps memory, resumes in milliseconds.
    Pause,
    /// Pause first; stop once it has stayed paused for another idle timeout.
    PauseThenStop,
}

impl FromStr for ScaleDown {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop" => Ok(ScaleDown::Stop),
            "pause" => Ok(ScaleDown::Pause),
            "pause-then-stop" => Ok(ScaleDown::PauseThenStop),
            other => Err(format!(
                "unknown scale-down action {other:?} (expected stop, pause or pause-then-stop)"
            )),
        }
    }
}

/// How the activator decides that the guest application is ready.
///
/// Parsed from the `vm-activator.io/readiness` annotation or the `readiness` config key:
/// ```
/// use vm_activator::vm::Readiness;
/// let probe: Readiness = "http:/healthz".parse().unwrap();
/// assert_eq!(probe.http_path(), Some("/healthz"));
/// assert_eq!("tcp".parse::<Readiness>().unwrap().http_path(), None);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Readiness {
    /// A TCP connection to the endpoint succeeds. Only meaningful when nothing in
    /// between accepts connections on the guest's behalf (QEMU user networking does).
    Tcp,
    /// An HTTP GET of this path answers 2xx or 3xx (as a Kubernetes httpGet probe).
    #[default]
    HttpRoot,
    /// An HTTP GET of the given path answers 2xx or 3xx.
    Http(String),
}

impl Readiness {
    /// The path an HTTP probe requests, or `None` for a TCP probe.
    pub fn http_path(&self) -> Option<&str> {
        match self {
            Readiness::Tcp => None,
            Readiness::HttpRoot => Some("/"),
            Readiness::Http(path) => Some(path),
        }
    }
}

impl FromStr for Readiness {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Readiness::Tcp),
            "http" => Ok(Readiness::HttpRoot),
            _ => match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') => Ok(Readiness::Http(path.to_string())),
                _ => Err(format!(
                    "unknown readiness {s:?} (expected tcp, http or http:/some/path)"
                )),
            },
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readiness::Tcp => f.write_str("tcp"),
            Readiness::HttpRoot => f.write_str("http"),
            Readiness::Http(path) => write!(f, "http:{path}"),
        }
    }
}

impl Serialize for Readiness {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Readiness {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Per-VM settings: from VM annotations (KubeVirt) or the YAML config (local QEMU).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Guest HTTP port inside the VM.
    pub port: u16,
    /// Path prefix on the guest; the ingress path's `rest` is appended to it.
    pub path: String,
    /// No activity for this long (and nothing in flight or held) → scale down.
    pub idle_timeout: Duration,
    /// What scale-down does.
    pub scale_down: ScaleDown,
    /// Start call to Ready must take at most this long; held requests then get 503.
    pub start_timeout: Duration,
    /// At most this many requests held while the VM is not Ready (further → 503).
    pub max_buffered: usize,
    /// At most this many body bytes held while the VM is not Ready (further → 503).
    pub max_buffered_bytes: usize,
    /// At most this many requests in flight to the guest at once; 0 = unlimited.
    pub concurrency: usize,
    /// How readiness is probed.
    pub readiness: Readiness,
    /// How long the guest may take to answer one request (→ 504).
    pub request_timeout: Duration,
    /// OIDC subjects allowed to deliver to this VM (`*` suffix wildcard); empty = any
    /// subject the global list allows.
    pub allowed_subjects: Vec<String>,
    /// Problems found while reading this policy (bad annotation values, each replaced
    /// by its default). Shown in `/v1/vms`.
    pub warnings: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            port: 8080,
            path: "/".to_string(),
            idle_timeout: Duration::from_secs(600),
            scale_down: ScaleDown::Stop,
            start_timeout: Duration::from_secs(120),
            max_buffered: 1000,
            max_buffered_bytes: 64 * 1024 * 1024,
            concurrency: 0,
            readiness: Readiness::HttpRoot,
            request_timeout: Duration::from_secs(30),
            allowed_subjects: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Annotation prefix of every per-VM setting.
pub const ANNOTATION_PREFIX: &str = "vm-activator.io/";
/// The label that opts a VirtualMachine in.
pub const OPT_IN_LABEL: &str = "vm-activator.io/enabled";
/// The annotation the activator writes with the last activity it saw.
pub const LAST_ACTIVITY_ANNOTATION: &str = "vm-activator.io/last-activity";

impl Policy {
    /// Reads a policy from VirtualMachine annotations (`vm-activator.io/port`, `/path`,
    /// `/idle-timeout`, `/scale-down`, `/start-timeout`, `/max-buffered`,
    /// `/concurrency`, `/readiness`, `/request-timeout`). A bad value never fails: it is
    /// replaced by the default and recorded in `warnings`.
    ///
    /// ```
    /// use vm_activator::vm::Policy;
    /// let policy = Policy::from_annotations([
    ///     ("vm-activator.io/port", "9000"),
    ///     ("vm-activator.io/idle-timeout", "ten minutes"),
    /// ]);
    /// assert_eq!(policy.port, 9000);
    /// assert_eq!(policy.idle_timeout, Policy::default().idle_timeout);
    /// assert!(policy.warnings[0].contains("idle-timeout"));
    /// ```
    pub fn from_annotations<'a>(annotations: impl IntoIterator<Item = (&'a str, &'a str)>) -> Policy {
        let mut policy = Policy::default();
        let mut warnings = Vec::new();
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let value = value.trim();
            let result: Result<(), String> = match name {
                "port" => value
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(|p| policy.port = p)
                    .ok_or_else(|| "expected a port 1-65535".to_string()),
                "path" if value.starts_with('/') => {
                    policy.path = value.to_string();
                    Ok(())
                }
                "path" => Err("expected a path starting with '/'".into()),
                "idle-timeout" => parse_positive_duration(value).map(|d| policy.idle_timeout = d),
                "start-timeout" => parse_positive_duration(value).map(|d| policy.start_timeout = d),
                "request-timeout" => parse_positive_duration(value).map(|d| policy.request_timeout = d),
                "scale-down" => value.parse().map(|s| policy.scale_down = s),
                "max-buffered" => value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(|n| policy.max_buffered = n)
                    .ok_or_else(|| "expected a whole number of at least 1".to_string()),
                "concurrency" => value
                    .parse::<usize>()
                    .map(|n| policy.concurrency = n)
                    .map_err(|_| "expected a whole number (0 = unlimited)".to_string()),
                "readiness" => value.parse().map(|r| policy.readiness = r),
                "allowed-subjects" => {
                    policy.allowed_subjects = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    Ok(())
                }
                // A label, or written by the activator; not policy.
                "enabled" | "last-activity" => Ok(()),
                _ => Err("unknown setting".into()),
            };
            if let Err(problem) = result {
                warnings.push(format!("{key}={value:?}: {problem}; using the default"));
            }
        }
        warnings.sort();
        policy.warnings = warnings;
        policy
    }
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be greater than 0".into()),
        Err(e) => Err(format!("expected a duration like 30s or 10m ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_parses_the_annotation_forms() {
        assert_eq!("tcp".parse::<Readiness>(), Ok(Readiness::Tcp));
        assert_eq!("http".parse::<Readiness>(), Ok(Readiness::HttpRoot));
        assert_eq!(
            "http:/healthz".parse::<Readiness>(),
            Ok(Readiness::Http("/healthz".into()))
        );
        assert!("http:healthz".parse::<Readiness>().is_err());
        assert!("grpc".parse::<Readiness>().is_err());
    }

    #[test]
    fn scale_down_parses_and_rejects_unknown() {
        assert_eq!("pause-then-stop".parse(), Ok(ScaleDown::PauseThenStop));
        assert!("halt".parse::<ScaleDown>().unwrap_err().contains("halt"));
    }

    #[test]
    fn annotations_table() {
        type Check = Box<dyn Fn(&Policy) -> bool>;
        let cases: Vec<(&str, &str, Check, bool)> = vec![
            ("port", "9000", Box::new(|p| p.port == 9000), false),
            ("port", "0", Box::new(|p| p.port == 8080), true),
            ("port", "http", Box::new(|p| p.port == 8080), true),
            ("path", "/api", Box::new(|p| p.path == "/api"), false),
            ("path", "api", Box::new(|p| p.path == "/"), true),
            (
                "idle-timeout",
                "90s",
                Box::new(|p| p.idle_timeout == Duration::from_secs(90)),
                false,
            ),
            (
                "idle-timeout",
                "0s",
                Box::new(|p| p.idle_timeout == Duration::from_secs(600)),
                true,
            ),
            (
                "start-timeout",
                "2m",
                Box::new(|p| p.start_timeout == Duration::from_secs(120)),
                false,
            ),
            (
                "scale-down",
                "pause-then-stop",
                Box::new(|p| p.scale_down == ScaleDown::PauseThenStop),
                false,
            ),
            (
                "scale-down",
                "hibernate",
                Box::new(|p| p.scale_down == ScaleDown::Stop),
                true,
            ),
            ("max-buffered", "50", Box::new(|p| p.max_buffered == 50), false),
            ("max-buffered", "-1", Box::new(|p| p.max_buffered == 1000), true),
            ("concurrency", "4", Box::new(|p| p.concurrency == 4), false),
            (
                "readiness",
                "http:/healthz",
                Box::new(|p| p.readiness == Readiness::Http("/healthz".into())),
                false,
            ),
            (
                "readiness",
                "ping",
                Box::new(|p| p.readiness == Readiness::HttpRoot),
                true,
            ),
            ("frobnicate", "1", Box::new(|_| true), true),
            ("last-activity", "2026-01-01T00:00:00.000Z", Box::new(|_| true), false),
        ];
        for (name, value, check, warns) in cases {
            let key = format!("{ANNOTATION_PREFIX}{name}");
            let policy = Policy::from_annotations([(key.as_str(), value), ("other.io/x", "ignored")]);
            assert!(check(&policy), "{name}={value}: {policy:?}");
            assert_eq!(
                !policy.warnings.is_empty(),
                warns,
                "{name}={value}: {:?}",
                policy.warnings
            );
            if warns {
                assert!(policy.warnings[0].contains(name));
            }
        }
    }

    #[test]
    fn vm_key_displays_as_path() {
        assert_eq!(VmKey::new("default", "demo").to_string(), "default/demo");
    }
}
