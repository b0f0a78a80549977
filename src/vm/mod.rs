//! Pure domain types shared by every layer: which VM ([`VmKey`]), where its guest
//! listens ([`Endpoint`]), what it is doing ([`VmPhase`]) and how it is to be run
//! ([`Policy`]).
//!
//! `policy.rs` has the per-VM policy and how it is read from annotations.
//!
//! Owns: plain data and its parsing. Must not import any other module of this crate but
//! the pure `idle_policy` (a policy holds the stored idle history), nor HTTP, Kubernetes
//! or process APIs.

mod policy;
mod schedule;

pub use schedule::Schedule;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use policy::{
    Policy, ANNOTATIONS, ANNOTATION_PREFIX, IDLE_HISTORY_ANNOTATION, LAST_ACTIVITY_ANNOTATION, OPT_IN_LABEL,
    SCALED_DOWN_FROM_ANNOTATION, VIRTUAL_MACHINE,
};

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
    /// Saved to disk, not running; the next event restores it (slower than a resume
    /// from pause, faster than a boot).
    Hibernated,
    /// The last start failed or timed out; the next event tries again.
    Failed,
}

impl VmPhase {
    /// Every phase, in the order used for the `vm_state` gauge.
    pub const ALL: [VmPhase; 8] = [
        VmPhase::Stopped,
        VmPhase::Starting,
        VmPhase::Probing,
        VmPhase::Ready,
        VmPhase::Stopping,
        VmPhase::Paused,
        VmPhase::Hibernated,
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
            VmPhase::Hibernated => "hibernated",
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
    /// Save the VM to disk and end it: no memory while idle, a restore (not a boot) on
    /// the next event. Backends that cannot hibernate stop instead.
    Hibernate,
    /// Pause first; hibernate once it has stayed paused for another idle timeout.
    PauseThenHibernate,
    /// Hibernate first; stop (dropping the saved state) after another idle timeout.
    HibernateThenStop,
}

impl ScaleDown {
    /// Whether this plan hibernates at some point.
    pub fn hibernates(self) -> bool {
        matches!(
            self,
            ScaleDown::Hibernate | ScaleDown::PauseThenHibernate | ScaleDown::HibernateThenStop
        )
    }
}

impl fmt::Display for ScaleDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScaleDown::Stop => "stop",
            ScaleDown::Pause => "pause",
            ScaleDown::PauseThenStop => "pause-then-stop",
            ScaleDown::Hibernate => "hibernate",
            ScaleDown::PauseThenHibernate => "pause-then-hibernate",
            ScaleDown::HibernateThenStop => "hibernate-then-stop",
        })
    }
}

impl FromStr for ScaleDown {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop" => Ok(ScaleDown::Stop),
            "pause" => Ok(ScaleDown::Pause),
            "pause-then-stop" => Ok(ScaleDown::PauseThenStop),
            "hibernate" => Ok(ScaleDown::Hibernate),
            "pause-then-hibernate" => Ok(ScaleDown::PauseThenHibernate),
            "hibernate-then-stop" => Ok(ScaleDown::HibernateThenStop),
            other => Err(format!(
                "unknown scale-down action {other:?} (expected stop, pause, pause-then-stop, hibernate, pause-then-hibernate or hibernate-then-stop)"
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
    fn vm_key_displays_as_path() {
        assert_eq!(VmKey::new("default", "demo").to_string(), "default/demo");
    }
}
