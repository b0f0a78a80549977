//! Test support for the KubeVirt backend: [`Kube`], what a scenario needs of a cluster —
//! the fake API server ([`FakeCluster`]) or a slice of the real one
//! ([`super::real_kube::RealKube`]) — and [`on_fake_and_real!`], which runs a scenario on
//! both; the fake API server with the binary pointed at it for fake-only scenarios (API
//! outages, compaction, the pause subresource); the RBAC check; matchers for the patches
//! the activator sends.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use fake_kube::{FakeKube, Options, Recorded, Res, WorkloadSpec};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::binary::Activator;
use super::real_kube::{RealKube, Timings};

/// What a KubeVirt scenario needs of a cluster. Objects live in [`Kube::ns`].
#[allow(async_fn_in_trait)]
pub trait Kube {
    /// The namespace this scenario's objects are in.
    fn ns(&self) -> &str;
    /// The binary with the kubevirt backend pointed at this cluster, plus `extra` flags.
    async fn spawn_activator(&self, extra: &[&str]) -> Activator {
        self.spawn_activator_with("", extra).await
    }
    /// As [`Kube::spawn_activator`], with `config` (top-level YAML keys other than
    /// `backend` and `kubevirt`) in its config file.
    async fn spawn_activator_with(&self, config: &str, extra: &[&str]) -> Activator;
    /// As [`Kube::spawn_activator`], with `kubevirt` (more keys of the `kubevirt` section,
    /// e.g. `scale_kinds: […]`, unindented, one line) in its config file.
    async fn spawn_activator_with_kubevirt(&self, kubevirt: &str) -> Activator;
    /// Grants the activator what the kustomize component `component` adds to its RBAC
    /// (the fake checks requests against every shipped rule instead).
    async fn grant_component_rbac(&self, component: &str);
    /// The Kubernetes Events (events.k8s.io/v1) in [`Kube::ns`], oldest first.
    async fn k8s_events(&self) -> Vec<Value>;
    /// Creates a VirtualMachine (halted unless `spec` says otherwise).
    async fn create_vm(&self, name: &str, labels: Value, annotations: Value, spec: Value);
    /// The VirtualMachine as JSON.
    async fn vm(&self, name: &str) -> Option<Value>;
    /// The VirtualMachineInstance as JSON.
    async fn vmi(&self, name: &str) -> Option<Value>;
    /// Sets `spec.runStrategy` as an operator would.
    async fn set_run_strategy(&self, name: &str, strategy: &str);
    /// Applies a JSON merge patch to a VirtualMachine, as an operator would.
    async fn patch_vm(&self, name: &str, patch: Value);
    /// Deletes a VirtualMachine.
    async fn delete_vm(&self, name: &str);
    /// Event ids the VM's guest accepted, over all its boots.
    fn guest_events(&self, name: &str) -> Vec<String>;
    /// Every request the activator(s) made.
    fn requests(&self) -> Vec<Recorded>;
    /// How many VMIs the VM got (one per boot).
    fn vmi_creations(&self, name: &str) -> usize;
    /// Creates a workload (Deployment, StatefulSet, VirtualMachinePool) in [`Kube::ns`].
    async fn create_workload(&self, spec: &WorkloadSpec);
    /// A workload (or any object of kind `res`) as JSON.
    async fn object(&self, res: Res, name: &str) -> Option<Value>;
    /// Scales a workload by hand, as `kubectl scale` does.
    async fn scale_by_hand(&self, res: Res, name: &str, replicas: u64);
    /// The pods in [`Kube::ns`] as JSON.
    async fn pods(&self) -> Vec<Value>;
    /// Deletes a pod at once; its guest dies with it.
    async fn kill_pod(&self, name: &str);
    /// Event ids each pod of a workload accepted, by pod name (gone pods included).
    fn workload_events(&self, workload: &str) -> BTreeMap<String, Vec<String>>;

    /// An opted-in workload of kind `res` at zero replicas, pods labelled `app: {name}`,
    /// with these annotations.
    fn workload_spec(&self, res: Res, name: &str, annotations: Value) -> WorkloadSpec {
        WorkloadSpec {
            annotations,
            ..WorkloadSpec::opted_in(res, self.ns(), name)
        }
    }

    /// An opted-in VM with these annotations, halted.
    async fn create_opted_in_vm(&self, name: &str, annotations: Value) {
        self.create_vm(name, json!({"vm-activator.io/enabled": "true"}), annotations, json!({}))
            .await
    }

    /// How many requests match.
    fn count(&self, predicate: impl Fn(&Recorded) -> bool) -> usize {
        self.requests().iter().filter(|r| predicate(r)).count()
    }

    /// Waits until a request matches; panics after `limit` naming `what`.
    async fn expect_request(&self, what: &str, limit: Duration, predicate: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.requests().into_iter().find(|r| predicate(r)) {
                return found;
            }
            assert!(Instant::now() < deadline, "expected request never came: {what}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The ingress path of VM `name`.
    fn path(&self, name: &str) -> String {
        format!("/{}/{name}", self.ns())
    }
}

/// The fake API server, with a kubeconfig for it.
pub struct FakeCluster {
    /// The fake.
    pub kube: FakeKube,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl FakeCluster {
    /// A fake API server booting guests at these timings.
    pub async fn start(timings: Timings) -> FakeCluster {
        let kube = FakeKube::start(Options {
            schedule_delay: timings.schedule,
            running_delay: timings.running,
            guest_delay: timings.guest,
            guest: timings.style,
            ..Options::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = kube.write_kubeconfig(dir.path());
        FakeCluster { kube, dir, kubeconfig }
    }
}

impl Kube for FakeCluster {
    fn ns(&self) -> &str {
        NS
    }
    async fn spawn_activator_with_kubevirt(&self, kubevirt: &str) -> Activator {
        // Keys right after `kubeconfig:` belong to the `kubevirt` section.
        self.spawn_activator_with(&format!("  {kubevirt}\n"), &[]).await
    }
    async fn grant_component_rbac(&self, _component: &str) {}
    async fn spawn_activator_with(&self, config: &str, extra: &[&str]) -> Activator {
        if config.is_empty() {
            return Activator::spawn_kubevirt(&self.kubeconfig, extra).await;
        }
        static FILES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.dir.path().join(format!("activator-{n}.yaml"));
        let text = format!(
            "backend: kubevirt\nkubevirt:\n  kubeconfig: {}\n{config}",
            self.kubeconfig.display()
        );
        std::fs::write(&file, text).unwrap();
        let mut args = vec!["--config", file.to_str().unwrap(), "--auth", "none"];
        args.extend_from_slice(extra);
        Activator::spawn(&args).await
    }
    async fn k8s_events(&self) -> Vec<Value> {
        self.kube.k8s_events(NS)
    }
    async fn create_vm(&self, name: &str, labels: Value, annotations: Value, spec: Value) {
        self.kube.create_vm(NS, name, labels, annotations, spec);
    }
    async fn vm(&self, name: &str) -> Option<Value> {
        self.kube.vm(NS, name)
    }
    async fn vmi(&self, name: &str) -> Option<Value> {
        self.kube.vmi(NS, name)
    }
    async fn set_run_strategy(&self, name: &str, strategy: &str) {
        self.kube.set_run_strategy(NS, name, strategy);
    }
    async fn patch_vm(&self, name: &str, patch: Value) {
        self.kube.patch_vm(NS, name, &patch);
    }
    async fn delete_vm(&self, name: &str) {
        self.kube.delete_vm(NS, name);
    }
    fn guest_events(&self, name: &str) -> Vec<String> {
        self.kube.guest_events(NS, name)
    }
    fn requests(&self) -> Vec<Recorded> {
        self.kube.requests()
    }
    fn vmi_creations(&self, name: &str) -> usize {
        self.kube.vmi_creations(NS, name)
    }
    async fn create_workload(&self, spec: &WorkloadSpec) {
        self.kube.create_workload(spec);
    }
    async fn object(&self, res: Res, name: &str) -> Option<Value> {
        self.kube.object(res, NS, name)
    }
    async fn scale_by_hand(&self, res: Res, name: &str, replicas: u64) {
        self.kube.scale_by_hand(res, NS, name, replicas);
    }
    async fn pods(&self) -> Vec<Value> {
        self.kube.pods(NS)
    }
    async fn kill_pod(&self, name: &str) {
        self.kube.kill_pod(NS, name);
    }
    fn workload_events(&self, workload: &str) -> BTreeMap<String, Vec<String>> {
        self.kube.workload_events(NS, workload)
    }
}

impl Kube for RealKube {
    fn ns(&self) -> &str {
        self.namespace()
    }
    async fn spawn_activator_with_kubevirt(&self, kubevirt: &str) -> Activator {
        RealKube::spawn_activator_via(self, None, &format!("  {kubevirt}\n"), "", &[]).await
    }
    async fn grant_component_rbac(&self, component: &str) {
        RealKube::grant_component_rbac(self, component).await
    }
    async fn spawn_activator_with(&self, config: &str, extra: &[&str]) -> Activator {
        RealKube::spawn_activator_with(self, config, extra).await
    }
    async fn k8s_events(&self) -> Vec<Value> {
        RealKube::k8s_events(self).await
    }
    async fn create_vm(&self, name: &str, labels: Value, annotations: Value, spec: Value) {
        RealKube::create_vm(self, name, labels, annotations, spec).await
    }
    async fn vm(&self, name: &str) -> Option<Value> {
        RealKube::vm(self, name).await
    }
    async fn vmi(&self, name: &str) -> Option<Value> {
        RealKube::vmi(self, name).await
    }
    async fn set_run_strategy(&self, name: &str, strategy: &str) {
        RealKube::set_run_strategy(self, name, strategy).await
    }
    async fn patch_vm(&self, name: &str, patch: Value) {
        RealKube::patch_vm(self, name, patch).await
    }
    async fn delete_vm(&self, name: &str) {
        RealKube::delete_vm(self, name).await
    }
    fn guest_events(&self, name: &str) -> Vec<String> {
        RealKube::guest_events(self, name)
    }
    fn requests(&self) -> Vec<Recorded> {
        RealKube::requests(self)
    }
    fn vmi_creations(&self, name: &str) -> usize {
        RealKube::vmi_creations(self, name)
    }
    async fn create_workload(&self, spec: &WorkloadSpec) {
        RealKube::create_workload(self, spec).await
    }
    async fn object(&self, res: Res, name: &str) -> Option<Value> {
        RealKube::object(self, res, name).await
    }
    async fn scale_by_hand(&self, res: Res, name: &str, replicas: u64) {
        RealKube::scale_by_hand(self, res, name, replicas).await
    }
    async fn pods(&self) -> Vec<Value> {
        RealKube::pods(self).await
    }
    async fn kill_pod(&self, name: &str) {
        RealKube::kill_pod(self, name).await
    }
    fn workload_events(&self, workload: &str) -> BTreeMap<String, Vec<String>> {
        RealKube::workload_events(self, workload)
    }
}

/// For each scenario `async fn name(kube: impl Kube, timings: Timings)` listed, a module
/// `name` with two tests: `fake` (the fake API server) and `real` (a slice of the real
/// one from ../shared/k8s; skipped with a message where that bundle is absent).
#[macro_export]
macro_rules! on_fake_and_real {
    (@timings) => { Timings::default() };
    (@timings $timings:expr) => { $timings };
    ($($scenario:ident $(with $timings:expr)?),* $(,)?) => {$(
        mod $scenario {
            #[allow(unused_imports)]
            use super::*;
            use super::support::kube::FakeCluster;
            use super::support::real_kube::{RealKube, Timings};

            fn timings() -> Timings {
                $crate::on_fake_and_real!(@timings $($timings)?)
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fake() {
                super::$scenario(FakeCluster::start(timings()).await).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() {
                if let Some(kube) = RealKube::start(timings()).await {
                    super::$scenario(kube).await
                }
            }
        }
    )*};
}

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
/// (`API_ACCESS`, which tests/manifests.rs checks against deploy/base/rbac.yaml, plus the
/// VirtualMachinePool component's rules). Against the real API server the RBAC
/// authorizer checks it too: nothing may have been 403.
pub fn assert_rbac_covers_every_request(requests: Vec<Recorded>) {
    use vm_activator::backend::kubevirt::{scale_kind_access, API_ACCESS};
    let pools = scale_kind_access("pool.kubevirt.io", "virtualmachinepools");
    for r in requests {
        assert_ne!(r.status, 403, "refused by the API server's RBAC: {r:?}");
        let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        // /api/v1/... is the core group (""); /apis/{group}/{version}/...
        let (group, after_version) = match parts[0] {
            "api" => ("", &parts[2..]),
            "apis" => (parts[1], &parts[3..]),
            other => panic!("not an API path ({other}): {r:?}"),
        };
        let rest = if after_version.first() == Some(&"namespaces") {
            &after_version[2..]
        } else {
            after_version
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
            .any(|(g, res, verbs)| *g == group && *res == resource && verbs.contains(&verb))
            || pools
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
    spawn_with_config(kube, &format!("  {kubevirt_key}\n"), "").await
}

/// The binary with a config file selecting the kubevirt backend (pointed at `kube`), with
/// `kubevirt_keys` (more keys of that section, indented by two) and `yaml` (more
/// top-level sections); the directory must outlive the process.
pub async fn spawn_with_config(kube: &FakeKube, kubevirt_keys: &str, yaml: &str) -> (tempfile::TempDir, Activator) {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let config = dir.path().join("config.yaml");
    let text = format!(
        "backend: kubevirt\nkubevirt:\n  kubeconfig: {}\n{kubevirt_keys}{yaml}",
        kubeconfig.display()
    );
    std::fs::write(&config, text).unwrap();
    let activator = Activator::spawn(&["--config", config.to_str().unwrap(), "--auth", "none"]).await;
    (dir, activator)
}

/// The merge patch that starts VM `name` in namespace `ns`.
pub fn start_patch<'a>(ns: &'a str, name: &'a str) -> impl Fn(&Recorded) -> bool + 'a {
    move |r| {
        r.is_vm_patch(ns, name)
            && r.content_type.starts_with("application/merge-patch+json")
            && r.body.contains("\"runStrategy\":\"Always\"")
    }
}

/// A patch that halts VM `name` in namespace `ns`.
pub fn stop_patch<'a>(ns: &'a str, name: &'a str) -> impl Fn(&Recorded) -> bool + 'a {
    move |r| r.is_vm_patch(ns, name) && r.body.contains("\"Halted\"")
}
