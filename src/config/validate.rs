//! Start-up checks of a whole configuration: ranges, uniqueness, and combinations
//! that cannot work. Every error names the field.

use std::time::Duration;

use super::{invalid, AuthMode, BackendKind, Config, ConfigError, VerbAuthMode};
use crate::vm::Readiness;

/// Most ingress worker threads: more than any machine's cores we expect, few enough that
/// a typo does not start thousands of threads.
const MAX_WORKER_THREADS: usize = 256;

impl Config {
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
        if self.ingress.listen_backlog == 0 {
            return Err(invalid("ingress.listen_backlog", "must be at least 1"));
        }
        if self.ingress.max_connections == 0 {
            return Err(invalid("ingress.max_connections", "must be at least 1"));
        }
        if self.ingress.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "ingress.worker_threads",
                format!("must be at most {MAX_WORKER_THREADS} (0 means one per CPU core)"),
            ));
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
        if let Err((key, message)) = self.idle.adaptive.settings().check() {
            return Err(invalid(format!("idle.adaptive.{key}"), message));
        }
        for (i, ns) in self.kubevirt.namespaces.iter().enumerate() {
            if !is_dns_label(ns) {
                return Err(invalid(format!("kubevirt.namespaces[{i}]"), "must be a DNS label"));
            }
        }
        let watch_timeout = self.kubevirt.watch_timeout;
        if watch_timeout < Duration::from_secs(5) || watch_timeout > Duration::from_secs(290) {
            return Err(invalid("kubevirt.watch_timeout", "must be between 5s and 290s"));
        }
        for (i, kind) in self.kubevirt.scale_kinds.iter().enumerate() {
            let field = |name: &str| format!("kubevirt.scale_kinds[{i}].{name}");
            if kind.version.is_empty() || !kind.version.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(invalid(
                    field("version"),
                    "must be an API version such as v1 or v1alpha1",
                ));
            }
            if kind.kind.is_empty() || !kind.kind.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(invalid(field("kind"), "must be a kind such as VirtualMachinePool"));
            }
            if !is_dns_label(&kind.plural) {
                return Err(invalid(
                    field("plural"),
                    "must be a lowercase resource name such as virtualmachinepools",
                ));
            }
            if kind.group.is_empty() || kind.group.split('.').any(|part| !is_dns_label(part)) {
                return Err(invalid(field("group"), "must be an API group such as pool.kubevirt.io"));
            }
            if kind.kind == crate::vm::VIRTUAL_MACHINE && kind.group == "kubevirt.io" {
                return Err(invalid(
                    field("kind"),
                    "VirtualMachines are always managed; list other kinds here",
                ));
            }
        }
        if self.backend == BackendKind::Kubevirt && !self.vms.is_empty() {
            return Err(invalid(
                "vms",
                "the kubevirt backend discovers its VMs by label; configure them with annotations, not here",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        match self.admin.verbs_auth {
            None if self.backend == BackendKind::Qemu && !self.admin_listen.ip().is_loopback() => {
                return Err(invalid(
                    "admin.verbs_auth",
                    "must be set (bearer, or none explicitly): anyone who can reach the admin listener could start and stop VMs; \
                     none is the default only for the local qemu backend with admin_listen on loopback",
                ))
            }
            Some(VerbAuthMode::Bearer) if self.admin.bearer_tokens_file.is_none() => {
                return Err(invalid("admin.bearer_tokens_file", "is required with verbs_auth bearer"))
            }
            Some(VerbAuthMode::Kubernetes) if self.backend != BackendKind::Kubevirt => {
                return Err(invalid(
                    "admin.verbs_auth",
                    "kubernetes needs the kubevirt backend (its API server reviews the tokens)",
                ))
            }
            _ => {}
        }
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
            if let Some(schedule) = &vm.keep_warm {
                if let Err(e) = schedule.parse::<crate::vm::Schedule>() {
                    return Err(invalid(field("keep_warm"), e));
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::VM;

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
    fn the_adaptive_policy_s_bounds_are_checked() {
        let cases = [
            ("bin: 10ms", "idle.adaptive.bin"),
            ("bin: 1s\n    range: 2h", "idle.adaptive.range"),
            ("min_keep_alive: 10s", "idle.adaptive.min_keep_alive"),
            ("max_keep_alive: 30s", "idle.adaptive.max_keep_alive"),
            ("cold_start_cost: 1s", "idle.adaptive.cold_start_cost"),
            ("min_samples: 0", "idle.adaptive.min_samples"),
        ];
        for (setting, field) in cases {
            let yaml = format!("{VM}idle:\n  policy: adaptive\n  adaptive:\n    {setting}\n");
            let err = Config::from_yaml(&yaml).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(field), "{setting}: {err}");
        }
        let yaml = format!("{VM}idle:\n  policy: adaptive\n  adaptive:\n    bin: 2s\n    range: 4m\n");
        let config = Config::from_yaml(&yaml).unwrap();
        config.validate().unwrap();
        let settings = config.idle.adaptive.settings();
        assert_eq!(settings.min_keep_alive, Duration::from_secs(2), "one bin by default");
        assert_eq!(
            settings.max_keep_alive,
            Duration::from_secs(240),
            "the range by default"
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
    fn admin_verbs_auth_rules() {
        let mut config = Config::from_yaml(VM).unwrap();
        config
            .validate()
            .expect("none is the default for qemu with a loopback admin listener");
        config.admin_listen = "0.0.0.0:9090".parse().unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("admin.verbs_auth"));
        config.admin.verbs_auth = Some(VerbAuthMode::Bearer);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("admin.bearer_tokens_file"));
        config.admin.bearer_tokens_file = Some("/tokens".into());
        config.validate().unwrap();
        config.admin.verbs_auth = Some(VerbAuthMode::Kubernetes);
        assert!(config.validate().unwrap_err().to_string().contains("kubevirt backend"));
        config.backend = BackendKind::Kubevirt;
        config.admin.verbs_auth = None;
        assert_eq!(config.verbs_auth(), VerbAuthMode::Kubernetes, "the kubevirt default");
    }

    /// Every value `validate` refuses, one row each: the error names the field, and the
    /// valid file it was changed from passes.
    #[test]
    fn every_refused_value_names_its_field() {
        type Change = fn(&mut Config);
        let rows: &[(&str, Change)] = &[
            ("ingress.max_body_bytes", |c| c.ingress.max_body_bytes = 0),
            ("ingress.max_concurrent_requests", |c| {
                c.ingress.max_concurrent_requests = 0
            }),
            ("ingress.max_header_bytes", |c| c.ingress.max_header_bytes = 1023),
            ("ingress.listen_backlog", |c| c.ingress.listen_backlog = 0),
            ("ingress.max_connections", |c| c.ingress.max_connections = 0),
            ("ingress.worker_threads", |c| c.ingress.worker_threads = 257),
            ("readiness.interval", |c| c.readiness.interval = Duration::ZERO),
            ("readiness.attempt_timeout", |c| {
                c.readiness.attempt_timeout = Duration::ZERO
            }),
            ("idle.check_interval", |c| c.idle.check_interval = Duration::ZERO),
            ("kubevirt.namespaces[1]", |c| {
                c.kubevirt.namespaces = vec!["default".into(), "Not_A_Label".into()]
            }),
            ("kubevirt.watch_timeout", |c| {
                c.kubevirt.watch_timeout = Duration::from_secs(4)
            }),
            ("kubevirt.watch_timeout", |c| {
                c.kubevirt.watch_timeout = Duration::from_secs(291)
            }),
            ("vms[0].namespace", |c| c.vms[0].namespace = "-edge".into()),
            ("vms[0].name", |c| c.vms[0].name = "x".repeat(64)),
            ("vms[1].name", |c| c.vms.push(c.vms[0].clone())),
            ("vms[0].keep_warm", |c| {
                c.vms[0].keep_warm = Some("Someday 25:00-26:00".into())
            }),
            ("vms[0].port", |c| c.vms[0].port = Some(0)),
            ("vms[0].path", |c| c.vms[0].path = Some("events".into())),
            ("vms[0].idle_timeout", |c| c.vms[0].idle_timeout = Some(Duration::ZERO)),
            ("vms[0].start_timeout", |c| {
                c.vms[0].start_timeout = Some(Duration::ZERO)
            }),
            ("vms[0].request_timeout", |c| {
                c.vms[0].request_timeout = Some(Duration::ZERO)
            }),
            ("vms[0].max_buffered", |c| c.vms[0].max_buffered = Some(0)),
            ("vms[0].max_buffered_bytes", |c| {
                c.vms[0].max_buffered_bytes = Some(c.ingress.max_body_bytes - 1)
            }),
            ("vms[0].machine.memory_mib", |c| c.vms[0].machine.memory_mib = 31),
            ("vms[0].machine.cpus", |c| c.vms[0].machine.cpus = 0),
            ("vms", |c| {
                c.backend = BackendKind::Kubevirt;
                c.ingress.auth.mode = Some(AuthMode::None);
            }),
        ];
        let valid = Config::from_yaml(VM).unwrap();
        valid.validate().expect("the file every row changes is valid");
        for (field, change) in rows {
            let mut config = Config::from_yaml(VM).unwrap();
            change(&mut config);
            let err = config.validate().expect_err(field).to_string();
            assert!(
                err.contains(&format!("{field}:")) || err.contains(&format!("{field} ")),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn tcp_readiness_is_refused_for_qemu_vms() {
        let config =
            Config::from_yaml(&VM.replace("max_buffered: 1000", "max_buffered: 1000\n    readiness: tcp")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("vms[0].readiness"), "{err}");
    }
}
