//! A real kube-apiserver for the KubeVirt scenarios: the bundle in `../shared/k8s` (started
//! once per test binary with its audit log on), a namespace per test, the activator under
//! a ServiceAccount of its own bound to the shipped ClusterRole (so the real RBAC
//! authorizer checks what we ship), and the test playing virt-controller — a VM asked to
//! run gets a VMI that goes Scheduled → Running with an address where fake-kube's guest
//! application listens a little later; a VM halted or deleted loses its VMI and guest.
//!
//! The requests the activator made are read back from the audit log (by its user), so
//! scenarios count and expect them as they do against the fake.
//!
//! Where the bundle is absent the scenarios are skipped with a message; in CI
//! (`CI=true`), where it is always present, its absence is a failure.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fake_kube::guest::GuestLog;
use fake_kube::{Recorded, Res, WorkloadSpec};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::binary::Activator;

mod audit;
mod kubelet;
pub mod own;
mod pool_controller;
mod virt_controller;

use audit::AuditReader;
use virt_controller::{virt_controller, vm_resource, vmi_resource};

/// The running test cluster, as `up.sh` printed it.
pub struct Env {
    /// `https://127.0.0.1:16443`.
    pub server: String,
    /// The run directory (kubeconfig, pki, logs).
    pub dir: PathBuf,
    /// The admin user's bearer token.
    pub admin_token: String,
}

static ENV: OnceLock<Option<Env>> = OnceLock::new();

/// The bundle's folder, if this machine has it (`K8S_BUNDLE` overrides the default
/// `../shared/k8s` next to the repository).
fn bundle() -> Option<PathBuf> {
    let dir = std::env::var_os("K8S_BUNDLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/k8s"));
    dir.join("up.sh").is_file().then_some(dir)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The test cluster, started on first use (a few seconds; already up: 0.1 s). `None`
/// where the bundle is absent.
pub fn env() -> Option<&'static Env> {
    ENV.get_or_init(|| {
        let Some(bundle) = bundle() else {
            assert!(
                !in_ci(),
                "CI must run the real-API-server tests: no Kubernetes test bundle at ../shared/k8s"
            );
            return None;
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/k8s");
        let out = Command::new(bundle.join("up.sh"))
            .arg("--audit")
            .arg(&dir)
            .output()
            .expect("up.sh runs");
        assert!(
            out.status.success(),
            "up.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exports: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').trim_matches('"').to_string()))
            .collect();
        Some(Env {
            server: exports["K8S_TEST_APISERVER"].clone(),
            dir: PathBuf::from(&exports["K8S_TEST_DIR"]),
            admin_token: exports["K8S_TEST_ADMIN_TOKEN"].clone(),
        })
    })
    .as_ref()
}

/// How the simulated virt-controller paces a boot (as fake-kube's `Options`).
#[derive(Clone, Copy)]
pub struct Timings {
    /// VMI created → Scheduled.
    pub schedule: Duration,
    /// Scheduled → Running with an address.
    pub running: Duration,
    /// Running → the guest application listens.
    pub guest: Duration,
    /// How the guests' HTTP servers behave.
    pub style: fake_kube::guest::GuestStyle,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            schedule: Duration::from_millis(20),
            running: Duration::from_millis(30),
            guest: Duration::from_millis(100),
            style: fake_kube::guest::GuestStyle::default(),
        }
    }
}

/// One test's slice of the real cluster. Dropping it ends its virt-controller and
/// guests and deletes its namespace.
pub struct RealKube {
    env: &'static Env,
    client: kube::Client,
    namespace: String,
    /// The activator's user name in the audit log.
    user: String,
    dir: tempfile::TempDir,
    activator_kubeconfig: PathBuf,
    logs: Arc<Mutex<HashMap<String, GuestLog>>>,
    /// VMIs created per VM.
    boots: Arc<Mutex<HashMap<String, usize>>>,
    controller: JoinHandle<()>,
    /// Guest logs of pods, by pod name.
    pod_logs: Arc<Mutex<HashMap<String, GuestLog>>>,
    kubelet: JoinHandle<()>,
    pool_controller: JoinHandle<()>,
    audit: Mutex<AuditReader>,
}

impl RealKube {
    /// A fresh namespace with the activator's ServiceAccount, and virt-controller played
    /// in it. `None` where the bundle is absent.
    pub async fn start(timings: Timings) -> Option<RealKube> {
        let Some(env) = env() else {
            let test = std::thread::current().name().unwrap_or("this test").to_string();
            eprintln!("skipped: {test} needs the Kubernetes test bundle (../shared/k8s/up.sh)");
            return None;
        };
        let kubeconfig = kube::config::Kubeconfig::read_from(env.dir.join("kubeconfig")).expect("admin kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("admin config");
        let client = kube::Client::try_from(config).expect("client");
        let namespace = unique_namespace();
        let audit = AuditReader::at_end(env.dir.join("logs/audit.log"));
        let api = |path: &str| format!("/api/v1{path}");
        post(&client, &api("/namespaces"), json!({"metadata": {"name": namespace}})).await;
        ensure_cluster_role(&client).await;
        post(
            &client,
            &api(&format!("/namespaces/{namespace}/serviceaccounts")),
            json!({"metadata": {"name": "vm-activator"}}),
        )
        .await;
        post(
            &client,
            &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"),
            json!({
                "metadata": {"name": "vm-activator"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "vm-activator"},
                "subjects": [{"kind": "ServiceAccount", "name": "vm-activator", "namespace": namespace}],
            }),
        )
        .await;
        let token = post(
            &client,
            &api(&format!("/namespaces/{namespace}/serviceaccounts/vm-activator/token")),
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}),
        )
        .await["status"]["token"]
            .as_str()
            .expect("a token")
            .to_string();
        let dir = tempfile::tempdir().unwrap();
        let activator_kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&activator_kubeconfig, &env.server, env, &token);
        let logs: Arc<Mutex<HashMap<String, GuestLog>>> = Arc::default();
        let boots: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let controller = tokio::spawn(virt_controller(
            client.clone(),
            namespace.clone(),
            logs.clone(),
            boots.clone(),
            timings,
        ));
        kubelet::ensure_node(&client).await;
        // Kata Containers' RuntimeClass, as a cluster with Kata has it: without it the
        // RuntimeClass admission plugin refuses pods that name it.
        post(
            &client,
            "/apis/node.k8s.io/v1/runtimeclasses",
            json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "kata-qemu"}, "handler": "kata-qemu"}),
        )
        .await;
        let pod_logs: Arc<Mutex<HashMap<String, GuestLog>>> = Arc::default();
        let kubelet = tokio::spawn(kubelet::kubelet(
            client.clone(),
            namespace.clone(),
            pod_logs.clone(),
            timings,
        ));
        let pool_controller = tokio::spawn(pool_controller::pool_controller(client.clone(), namespace.clone()));
        Some(RealKube {
            env,
            client,
            user: format!("system:serviceaccount:{namespace}:vm-activator"),
            namespace,
            dir,
            activator_kubeconfig,
            logs,
            boots,
            controller,
            pod_logs,
            kubelet,
            pool_controller,
            audit: Mutex::new(audit),
        })
    }

    /// This test's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The binary with the kubevirt backend, scoped to this namespace, under the
    /// activator's ServiceAccount; `extra` flags added.
    pub async fn spawn_activator(&self, extra: &[&str]) -> Activator {
        self.spawn_activator_with("", extra).await
    }

    /// As [`RealKube::spawn_activator`], with `yaml` (more top-level keys) in its config.
    pub async fn spawn_activator_with(&self, yaml: &str, extra: &[&str]) -> Activator {
        self.spawn_activator_via(None, "", yaml, extra).await
    }

    /// As [`RealKube::spawn_activator_with`], reaching the API server at `server` (e.g.
    /// `https://127.0.0.1:port` of a fault proxy; the server's own address with `None`),
    /// with `kubevirt_yaml` (more keys of the `kubevirt` section, indented by two).
    pub async fn spawn_activator_via(
        &self,
        server: Option<&str>,
        kubevirt_yaml: &str,
        yaml: &str,
        extra: &[&str],
    ) -> Activator {
        let suffix = unique_suffix();
        let kubeconfig = match server {
            Some(server) => {
                let path = self.dir.path().join(format!("kubeconfig-{suffix}"));
                let token = std::fs::read_to_string(&self.activator_kubeconfig).unwrap();
                let token = token
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("token: "))
                    .expect("the activator's token")
                    .to_string();
                write_kubeconfig(&path, server, self.env, &token);
                path
            }
            None => self.activator_kubeconfig.clone(),
        };
        let config = self.dir.path().join(format!("activator-{suffix}.yaml"));
        let text = format!(
            "backend: kubevirt\nkubevirt:\n  kubeconfig: {}\n  namespaces: [{}]\n{kubevirt_yaml}{yaml}",
            kubeconfig.display(),
            self.namespace
        );
        std::fs::write(&config, text).unwrap();
        let mut args = vec!["--config", config.to_str().unwrap(), "--auth", "none"];
        args.extend_from_slice(extra);
        Activator::spawn(&args).await
    }

    /// Grants the activator's ServiceAccount in this namespace what a kustomize component
    /// adds (`deploy/components/{component}/rbac.yaml`): its ClusterRole as shipped, bound
    /// by a RoleBinding here.
    pub async fn grant_component_rbac(&self, component: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("deploy/components/{component}/rbac.yaml"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let role = text
            .split("\n---")
            .map(|doc| serde_norway::from_str::<Value>(doc).unwrap())
            .find(|doc| doc["kind"] == "ClusterRole")
            .expect("the component ships a ClusterRole");
        let name = role["metadata"]["name"].as_str().expect("a name").to_string();
        let rules = json!({"rules": role["rules"].clone()});
        post(&self.client, "/apis/rbac.authorization.k8s.io/v1/clusterroles", role).await;
        let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(self.client.clone());
        roles
            .patch(&name, &PatchParams::default(), &Patch::Merge(&rules))
            .await
            .expect("update the ClusterRole");
        post(
            &self.client,
            &format!(
                "/apis/rbac.authorization.k8s.io/v1/namespaces/{}/rolebindings",
                self.namespace
            ),
            json!({
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": "vm-activator", "namespace": self.namespace}],
            }),
        )
        .await;
    }

    /// Writes `config.yaml` and `kubeconfig` into `dir` for an activator that will see
    /// `dir` as `inside` (e.g. a folder mounted into an image's root filesystem): the
    /// kubevirt backend, scoped to this namespace, under the activator's ServiceAccount.
    pub fn write_activator_files(&self, dir: &Path, inside: &str) {
        std::fs::copy(&self.activator_kubeconfig, dir.join("kubeconfig")).expect("kubeconfig copied");
        let text = format!(
            "backend: kubevirt\nkubevirt:\n  kubeconfig: {inside}/kubeconfig\n  namespaces: [{}]\n",
            self.namespace
        );
        std::fs::write(dir.join("config.yaml"), text).expect("config written");
    }

    fn vms(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &vm_resource())
    }

    fn vmis(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &vmi_resource())
    }

    /// Creates a VirtualMachine (halted unless `spec` says otherwise) in this namespace.
    pub async fn create_vm(&self, name: &str, labels: Value, annotations: Value, spec: Value) {
        let object: DynamicObject =
            serde_json::from_value(fake_kube::vm_object(name, labels, annotations, spec)).unwrap();
        self.vms()
            .create(&PostParams::default(), &object)
            .await
            .expect("VM created");
    }

    /// The VirtualMachine as JSON.
    pub async fn vm(&self, name: &str) -> Option<Value> {
        let vm = self.vms().get_opt(name).await.expect("get VM")?;
        Some(serde_json::to_value(vm).unwrap())
    }

    /// The VirtualMachineInstance as JSON.
    pub async fn vmi(&self, name: &str) -> Option<Value> {
        let vmi = self.vmis().get_opt(name).await.expect("get VMI")?;
        Some(serde_json::to_value(vmi).unwrap())
    }

    /// Sets `spec.runStrategy` as an operator would.
    pub async fn set_run_strategy(&self, name: &str, strategy: &str) {
        self.patch_vm(name, json!({"spec": {"runStrategy": strategy}})).await;
    }

    /// Applies a JSON merge patch to a VirtualMachine.
    pub async fn patch_vm(&self, name: &str, patch: Value) {
        self.vms()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch VM");
    }

    /// Deletes a VirtualMachine (its VMI follows).
    pub async fn delete_vm(&self, name: &str) {
        self.vms()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete VM");
    }

    /// Event ids the VM's guest accepted, over all its boots.
    pub fn guest_events(&self, name: &str) -> Vec<String> {
        let logs = self.logs.lock().unwrap();
        logs.get(name).map(|l| l.lock().unwrap().clone()).unwrap_or_default()
    }

    /// How many VMIs the VM got (boots).
    pub fn vmi_creations(&self, name: &str) -> usize {
        self.boots.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    /// The Kubernetes Events (events.k8s.io/v1) in this namespace, oldest first.
    pub async fn k8s_events(&self) -> Vec<Value> {
        let gvk = GroupVersionKind::gvk("events.k8s.io", "v1", "Event");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "events");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
        let list = api.list(&Default::default()).await.expect("list events");
        let mut events: Vec<Value> = list
            .items
            .into_iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect();
        events.sort_by_key(|e| e["eventTime"].as_str().unwrap_or_default().to_string());
        events
    }

    /// Every request the activator made since this slice started, from the audit log
    /// (kubevirt.io and apps requests; core resources such as pods are not audited).
    pub fn requests(&self) -> Vec<Recorded> {
        self.audit.lock().unwrap().requests_of(&self.user)
    }

    fn objects(&self, res: Res) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk(res.group(), res.version(), res.kind());
        let resource = ApiResource::from_gvk_with_plural(&gvk, res.plural());
        Api::namespaced_with(self.client.clone(), &self.namespace, &resource)
    }

    /// Creates a workload in this namespace (the spec's namespace is ignored).
    pub async fn create_workload(&self, spec: &WorkloadSpec) {
        let mut object = spec.object();
        object["metadata"]["namespace"] = json!(self.namespace);
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        self.objects(spec.res)
            .create(&PostParams::default(), &object)
            .await
            .expect("workload created");
    }

    /// A workload (or any object of kind `res`) as JSON.
    pub async fn object(&self, res: Res, name: &str) -> Option<Value> {
        let object = self.objects(res).get_opt(name).await.expect("get")?;
        Some(serde_json::to_value(object).unwrap())
    }

    /// Scales a workload by hand through `/scale`, as `kubectl scale` does.
    pub async fn scale_by_hand(&self, res: Res, name: &str, replicas: u64) {
        self.objects(res)
            .patch_scale(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
            )
            .await
            .expect("scale");
    }

    /// The pods of this namespace as JSON.
    pub async fn pods(&self) -> Vec<Value> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let list = pods.list(&Default::default()).await.expect("list pods");
        list.items
            .into_iter()
            .map(|p| serde_json::to_value(p).unwrap())
            .collect()
    }

    /// Deletes a pod at once, as `kubectl delete pod --grace-period=0 --force` does.
    pub async fn kill_pod(&self, name: &str) {
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        pods.delete(name, &DeleteParams::default().grace_period(0))
            .await
            .expect("delete pod");
    }

    /// Event ids each pod whose name starts with `{workload}-` accepted (gone ones included).
    pub fn workload_events(&self, workload: &str) -> BTreeMap<String, Vec<String>> {
        let prefix = format!("{workload}-");
        self.pod_logs
            .lock()
            .unwrap()
            .iter()
            .filter(|(pod, _)| pod.starts_with(&prefix))
            .map(|(pod, log)| (pod.clone(), log.lock().unwrap().clone()))
            .collect()
    }
}

impl Drop for RealKube {
    fn drop(&mut self) {
        self.controller.abort();
        self.kubelet.abort();
        self.pool_controller.abort();
        // Deleting a namespace takes the API server a few seconds; nobody waits for it.
        let _ = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-X", "DELETE", "-H"])
            .arg(format!("Authorization: Bearer {}", self.env.admin_token))
            .arg(format!("{}/api/v1/namespaces/{}", self.env.server, self.namespace))
            .spawn();
    }
}

/// `t-` plus a suffix unique across processes and time.
fn unique_namespace() -> String {
    format!("t-{}", unique_suffix())
}

fn unique_suffix() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}{:x}{n}", std::process::id(), nanos)
}

/// POSTs `body` to `path` as the admin; 409 (already there) counts as done.
async fn post(client: &kube::Client, path: &str, body: Value) -> Value {
    let request = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    match client.request::<Value>(request).await {
        Ok(value) => value,
        Err(kube::Error::Api(status)) if status.code == 409 => Value::Null,
        Err(e) => panic!("POST {path}: {e}"),
    }
}

/// The ClusterRole `deploy/base/rbac.yaml` ships, created once per cluster.
async fn ensure_cluster_role(client: &kube::Client) {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/rbac.yaml")).unwrap();
    let role = text
        .split("\n---")
        .map(|doc| serde_norway::from_str::<Value>(doc).unwrap())
        .find(|doc| doc["kind"] == "ClusterRole")
        .expect("deploy/base/rbac.yaml has a ClusterRole");
    assert_eq!(role["metadata"]["name"], "vm-activator");
    let rules = json!({"rules": role["rules"].clone()});
    post(client, "/apis/rbac.authorization.k8s.io/v1/clusterroles", role).await;
    // A cluster kept from an earlier run may hold an older role: make it this one.
    let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(client.clone());
    roles
        .patch("vm-activator", &PatchParams::default(), &Patch::Merge(&rules))
        .await
        .expect("update the ClusterRole");
}

fn write_kubeconfig(path: &Path, server: &str, env: &Env, token: &str) {
    use base64::Engine;
    let ca = std::fs::read(env.dir.join("pki/ca.crt")).expect("CA");
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n- name: activator\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: activator\n\
         current-context: test\n"
    );
    std::fs::write(path, text).unwrap();
}
