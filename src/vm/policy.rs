//! The per-VM policy — the same settings from VirtualMachine annotations (KubeVirt)
//! or the YAML config (local QEMU) — and how annotations are read: a bad value never
//! fails, it is replaced by its default and listed as a warning.

use std::sync::Arc;
use std::time::Duration;

use super::{Readiness, ScaleDown, Schedule};
use crate::idle_policy::{History, IdlePolicy};

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
    /// At most this many requests in flight to each endpoint (the VM's guest, a ready
    /// pod) at once; 0 = unlimited.
    pub concurrency: usize,
    /// How readiness is probed.
    pub readiness: Readiness,
    /// How long the guest may take to answer one request (→ 504).
    pub request_timeout: Duration,
    /// OIDC subjects allowed to deliver to this VM (`*` suffix wildcard); empty = any
    /// subject the global list allows.
    pub allowed_subjects: Vec<String>,
    /// What the target is: `VirtualMachine` (KubeVirt or local QEMU), `Deployment`,
    /// `StatefulSet`, or a configured kind with a `/scale` subresource.
    pub kind: String,
    /// Why events to this name are refused (409) instead of starting anything — e.g. two
    /// opted-in workloads share the name. Shown in `/v1/vms`.
    pub refused: Option<String>,
    /// Replicas to scale a workload up to when no count was remembered at its last
    /// scale-down (`vm-activator.io/replicas`); `None` = 1. VMs ignore it.
    pub replicas: Option<u32>,
    /// The Multus network (`namespace/name` or `name`, in the target's namespace) whose
    /// address is the guest's (`vm-activator.io/network`); `None` = the pod network.
    pub network: Option<String>,
    /// When the VM must be running whatever its traffic (`vm-activator.io/keep-warm`):
    /// started ahead of each window, never scaled down inside one.
    pub keep_warm: Option<Arc<Schedule>>,
    /// The idle policy (`vm-activator.io/idle-policy`); `None` = the global `idle.policy`.
    pub idle_policy: Option<IdlePolicy>,
    /// The idle history stored on the target (`vm-activator.io/idle-history`, written by
    /// the activator with its scale-downs; the local backend's file in `run_dir`).
    pub idle_history: Option<Arc<History>>,
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
            kind: VIRTUAL_MACHINE.to_string(),
            refused: None,
            replicas: None,
            network: None,
            keep_warm: None,
            idle_policy: None,
            idle_history: None,
            warnings: Vec::new(),
        }
    }
}

/// The kind of a KubeVirt (or local QEMU) VM.
pub const VIRTUAL_MACHINE: &str = "VirtualMachine";

/// Annotation prefix of every per-VM setting.
pub const ANNOTATION_PREFIX: &str = "vm-activator.io/";
/// Every name under `vm-activator.io/` the activator reads or writes (the opt-in label
/// among them); any other is reported as an unknown setting. The handbook must name each
/// (tests/docs.rs), and a unit test below checks each is known to the parser.
pub const ANNOTATIONS: &[&str] = &[
    "enabled",
    "port",
    "path",
    "readiness",
    "idle-timeout",
    "start-timeout",
    "request-timeout",
    "scale-down",
    "keep-warm",
    "max-buffered",
    "concurrency",
    "allowed-subjects",
    "replicas",
    "network",
    "idle-policy",
    "idle-history",
    "last-activity",
    "scaled-down-from",
];
/// The label that opts a VirtualMachine in.
pub const OPT_IN_LABEL: &str = "vm-activator.io/enabled";
/// The annotation the activator writes with the last activity it saw.
pub const LAST_ACTIVITY_ANNOTATION: &str = "vm-activator.io/last-activity";
/// The annotation the activator writes on a workload it scales to zero: the replica
/// count it had, restored at the next start.
pub const SCALED_DOWN_FROM_ANNOTATION: &str = "vm-activator.io/scaled-down-from";
/// The annotation the activator writes with its idle scale-downs: the target's idle
/// history (`idle_policy::History`), shared by every replica and kept across restarts.
pub const IDLE_HISTORY_ANNOTATION: &str = crate::idle_policy::HISTORY_ANNOTATION;

impl Policy {
    /// Reads a policy from VirtualMachine annotations (`vm-activator.io/port`, `/path`,
    /// `/idle-timeout`, `/scale-down`, `/start-timeout`, `/max-buffered`,
    /// `/concurrency`, `/readiness`, `/request-timeout`, `/allowed-subjects`, `/keep-warm`,
    /// `/idle-policy`, the activator's own `/idle-history`, and for workloads `/replicas`
    /// and `/network`). A bad value never fails: it is replaced by the default and
    /// recorded in `warnings`.
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
                "keep-warm" => value.parse().map(|s| policy.keep_warm = Some(Arc::new(s))),
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
                "replicas" => value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(|n| policy.replicas = Some(n))
                    .ok_or_else(|| "expected a whole number of at least 1".to_string()),
                "network" => parse_network(value).map(|n| policy.network = Some(n)),
                "idle-policy" => value.parse().map(|p| policy.idle_policy = Some(p)),
                "idle-history" => policy.read_idle_history(value),
                // A label, or written by the activator; not policy.
                "enabled" | "last-activity" | "scaled-down-from" => Ok(()),
                _ => Err("unknown setting".into()),
            };
            if let Err(problem) = result {
                // A history is long; its beginning is enough to recognise it.
                let shown: String = value.chars().take(80).collect();
                let more = if shown.len() < value.len() { "…" } else { "" };
                warnings.push(format!("{key}={shown:?}{more}: {problem}; using the default"));
            }
        }
        warnings.sort();
        policy.warnings = warnings;
        policy
    }
}

impl Policy {
    /// Takes a stored idle history (the annotation's or the local file's text). A text
    /// that does not parse is refused with the reason: the target then runs on the fixed
    /// idle timeout until its next scale-down writes a good history.
    pub fn read_idle_history(&mut self, text: &str) -> Result<(), String> {
        let history = History::parse(text)
            .map_err(|e| format!("{e}; the fixed idle timeout applies until it is written anew"))?;
        self.idle_history = Some(Arc::new(history));
        Ok(())
    }
}

/// A Multus network reference: `name` or `namespace/name`, DNS-1123 parts.
fn parse_network(value: &str) -> Result<String, String> {
    let valid = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    match value.split_once('/') {
        Some((ns, name)) if valid(ns) && valid(name) => Ok(value.to_string()),
        None if valid(value) => Ok(value.to_string()),
        _ => Err("expected a network as name or namespace/name".into()),
    }
}

impl Policy {
    /// The Multus network as `namespace/name`: a bare name is in the target's namespace.
    pub fn qualified_network(&self, namespace: &str) -> Option<String> {
        let network = self.network.as_deref()?;
        Some(match network.contains('/') {
            true => network.to_string(),
            false => format!("{namespace}/{network}"),
        })
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
    fn every_listed_annotation_is_known_and_no_other() {
        for name in ANNOTATIONS.iter().chain(["service", "no-such-setting"].iter()) {
            let key = format!("{ANNOTATION_PREFIX}{name}");
            let policy = Policy::from_annotations([(key.as_str(), "?")]);
            let unknown = policy.warnings.iter().any(|w| w.contains("unknown setting"));
            assert_eq!(unknown, !ANNOTATIONS.contains(name), "{key}: {:?}", policy.warnings);
        }
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
                Box::new(|p| p.scale_down == ScaleDown::Hibernate),
                false,
            ),
            (
                "scale-down",
                "hibernate-then-stop",
                Box::new(|p| p.scale_down == ScaleDown::HibernateThenStop),
                false,
            ),
            (
                "scale-down",
                "halt",
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
            ("replicas", "3", Box::new(|p| p.replicas == Some(3)), false),
            ("replicas", "0", Box::new(|p| p.replicas.is_none()), true),
            (
                "network",
                "vlan-10",
                Box::new(|p| p.qualified_network("apps").as_deref() == Some("apps/vlan-10")),
                false,
            ),
            (
                "network",
                "infra/vlan-10",
                Box::new(|p| p.qualified_network("apps").as_deref() == Some("infra/vlan-10")),
                false,
            ),
            ("network", "a/b/c", Box::new(|p| p.network.is_none()), true),
            ("scaled-down-from", "3", Box::new(|_| true), false),
            ("frobnicate", "1", Box::new(|_| true), true),
            ("last-activity", "2026-01-01T00:00:00.000Z", Box::new(|_| true), false),
            (
                "idle-policy",
                "adaptive",
                Box::new(|p| p.idle_policy == Some(IdlePolicy::Adaptive)),
                false,
            ),
            ("idle-policy", "smart", Box::new(|p| p.idle_policy.is_none()), true),
            (
                "idle-history",
                "v1 bin=1m at=1764905359123 oob=0 gaps=14:3",
                Box::new(|p| p.idle_history.as_ref().is_some_and(|h| h.samples() == 3)),
                false,
            ),
            (
                "idle-history",
                "v1 bin=1m gaps=14:three",
                Box::new(|p| p.idle_history.is_none()),
                true,
            ),
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
}
