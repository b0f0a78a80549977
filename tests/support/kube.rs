//! Test support for the KubeVirt backend: the fake API server with the binary pointed
//! at it, the RBAC check every scenario ends with, and matchers for the patches the
//! activator sends.

use std::time::Duration;

use fake_kube::{FakeKube, Options, Recorded};
use serde_json::json;

use super::binary::Activator;

/// The namespace the scenarios use.
pub const NS: &str = "apps";

/// Annotations of an opted-in VM with this idle timeout.
pub fn annotations(idle: &str) -> serde_json::Value {
    json!({
        "vm-activator.io/port": "8080",
        "vm-activator.io/readiness": "http:/healthz",
        "vm-activator.io/idle-timeout": idle,
        "vm-activator.io/start-timeout": "20s",
    })
}

/// A fake API server with an activator process pointed at it.
pub struct Cluster {
    pub kube: FakeKube,
    _dir: tempfile::TempDir,
    pub activator: Activator,
}

/// Starts the fake API server, lets `setup` create objects, starts the binary and
/// waits until it is ready.
pub async fn cluster(options: Options, setup: impl FnOnce(&FakeKube)) -> Cluster {
    let kube = FakeKube::start(options).await;
    setup(&kube);
    let (dir, activator) = spawn_with_kubeconfig(&kube).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(10)).await;
    Cluster {
        kube,
        _dir: dir,
        activator,
    }
}

/// Every request the activator made is allowed by the RBAC it ships with
/// (`API_ACCESS`, which tests/manifests.rs checks against deploy/base/rbac.yaml).
pub fn assert_rbac_covers_every_request(kube: &FakeKube) {
    use vm_activator::backend::kubevirt::API_ACCESS;
    for r in kube.requests() {
        let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        assert_eq!(parts[0], "apis", "{r:?}");
        let group = parts[1];
        let rest = if parts.get(3) == Some(&"namespaces") {
            &parts[5..]
        } else {
            &parts[3..]
        };
        let resource = match rest.get(2) {
            Some(sub) => format!("{}/{sub}", rest[0]),
            None => rest[0].to_string(),
        };
        let verb = match (r.method.as_str(), rest.len() > 1) {
            ("GET", false) if r.is_watch() => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("PATCH", _) => "patch",
            ("PUT", _) => "update",
            ("POST", _) => "create",
            ("DELETE", _) => "delete",
            (m, _) => panic!("unexpected method {m}"),
        };
        let allowed = API_ACCESS
            .iter()
            .any(|(g, res, verbs)| *g == group && *res == resource && verbs.contains(&verb));
        assert!(allowed, "{verb} {group}/{resource} is not in the shipped RBAC: {r:?}");
    }
}

/// The binary with `--backend kubevirt` and a kubeconfig for `kube`; the directory
/// holding the kubeconfig must outlive the process.
pub async fn spawn_with_kubeconfig(kube: &FakeKube) -> (tempfile::TempDir, Activator) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let activator = Activator::spawn_kubevirt(&kubeconfig, &[]).await;
    (dir, activator)
}

/// The binary with a config file selecting the kubevirt backend (pointed at `kube`) plus
/// one more `kubevirt:` key; the directory must outlive the process.
pub async fn spawn_with_kubevirt_config(kube: &FakeKube, kubevirt_key: &str) -> (tempfile::TempDir, Activator) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let config = dir.path().join("config.yaml");
    let text = format!(
        "backend: kubevirt\nkubevirt:\n  kubeconfig: {}\n  {kubevirt_key}\n",
        kubeconfig.display()
    );
    std::fs::write(&config, text).unwrap();
    let activator = Activator::spawn(&["--config", config.to_str().unwrap(), "--auth", "none"]).await;
    (dir, activator)
}

/// The merge patch that starts VM `name`.
pub fn start_patch(name: &'static str) -> impl Fn(&Recorded) -> bool {
    move |r| {
        r.is_vm_patch(NS, name)
            && r.content_type.starts_with("application/merge-patch+json")
            && r.body.contains("\"runStrategy\":\"Always\"")
    }
}

/// A patch that halts VM `name`.
pub fn stop_patch(name: &'static str) -> impl Fn(&Recorded) -> bool {
    move |r| r.is_vm_patch(NS, name) && r.body.contains("\"Halted\"")
}
