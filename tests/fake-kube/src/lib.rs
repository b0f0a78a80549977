//! A fake kube-apiserver on loopback for KubeVirt `VirtualMachine`s and
//! `VirtualMachineInstance`s, faithful for what vm-activator uses: resourceVersion on
//! every object, LIST (paginated with `limit`/`continue`, except from the watch cache
//! with `resourceVersion=0`), WATCH (chunked JSON lines, bookmarks, synthetic ADDED events
//! for `resourceVersion=0`, an ERROR event with 410 Gone for a compacted version),
//! label selectors (objects leaving a watch's selector arrive as DELETED), merge patch
//! and JSON patch (a failed `test` op → 422), 415 for strategic-merge patch on these
//! custom resources, 404, 409 on a stale `metadata.resourceVersion`, KubeVirt's
//! `running`/`runStrategy` exclusivity (422), and the `pause`/`unpause` subresources.
//!
//! A simulated virt-controller reacts like KubeVirt: a VM whose `runStrategy` becomes
//! `Always` (or `running: true`) gets a VMI that goes Pending → Scheduled → Running
//! with an address on 127.0.0.0/8, where a guest HTTP server starts listening a little
//! later; `Halted` (or deleting the VM) deletes the VMI and its guest.
//!
//! Every request is recorded, so tests read as scripted scenarios:
//! `expect_request(..)` fails if an expected request never comes.
//!
//! `store.rs` has the objects, their versions and history; `api.rs` the HTTP routes;
//! `list_watch.rs` LIST and WATCH; `selector.rs` label selectors; `virt_controller.rs`
//! the simulated virt-controller and the guests it boots.

mod api;
mod events;
pub mod fault_proxy;
pub mod guest;
mod list_watch;
pub mod ports;
mod reviews;
mod selector;
mod store;
mod virt_controller;
mod workloads;

use api::router;
use guest::GuestLog;
use store::{Change, Store};
use virt_controller::virt_controller;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Timings of the simulated cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// VMI created → `Scheduled`.
    pub schedule_delay: Duration,
    /// `Scheduled` → `Running` with an IP address.
    pub running_delay: Duration,
    /// `Running` → the guest application listens (the guest OS boots after the VMI runs).
    pub guest_delay: Duration,
    /// `Halted` → the VMI is deleted.
    pub stop_delay: Duration,
    /// How often open watches get a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Open watches pass each change on this long after it was made (a loaded API
    /// server: a client's store lags behind its own writes).
    pub watch_delay: Duration,
    /// How the guests' HTTP servers behave.
    pub guest: guest::GuestStyle,
    /// Put a [`fault_proxy::FaultProxy`] at each guest's address, in front of the guest
    /// (listening elsewhere), for tests to break the path ([`FakeKube::guest_proxy`]).
    pub guest_behind_proxy: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            schedule_delay: Duration::from_millis(20),
            running_delay: Duration::from_millis(30),
            guest_delay: Duration::from_millis(100),
            stop_delay: Duration::from_millis(20),
            bookmark_interval: Duration::from_millis(500),
            watch_delay: Duration::ZERO,
            guest: guest::GuestStyle::default(),
            guest_behind_proxy: false,
        }
    }
}

/// The resources served: KubeVirt's VMs and VMIs, apps/v1 Deployments and
/// StatefulSets, core/v1 pods, and KubeVirt's VirtualMachinePool (a custom resource with a
/// `/scale` subresource).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    /// `kubevirt.io/v1` `virtualmachines`
    Vm,
    /// `kubevirt.io/v1` `virtualmachineinstances`
    Vmi,
    /// `apps/v1` `deployments`
    Deployment,
    /// `apps/v1` `statefulsets`
    StatefulSet,
    /// `v1` `pods`
    Pod,
    /// `pool.kubevirt.io/v1beta1` `virtualmachinepools`
    VmPool,
}

impl Res {
    const ALL: [Res; 6] = [
        Res::Vm,
        Res::Vmi,
        Res::Deployment,
        Res::StatefulSet,
        Res::Pod,
        Res::VmPool,
    ];

    /// The API group ("" for the core group).
    pub fn group(self) -> &'static str {
        match self {
            Res::Vm | Res::Vmi => "kubevirt.io",
            Res::Deployment | Res::StatefulSet => "apps",
            Res::Pod => "",
            Res::VmPool => "pool.kubevirt.io",
        }
    }

    /// The API version.
    pub fn version(self) -> &'static str {
        match self {
            Res::Vm | Res::Vmi | Res::Deployment | Res::StatefulSet | Res::Pod => "v1",
            Res::VmPool => "v1beta1",
        }
    }

    /// `apiVersion` of objects.
    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            group => format!("{group}/{}", self.version()),
        }
    }

    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Res::Vm => "virtualmachines",
            Res::Vmi => "virtualmachineinstances",
            Res::Deployment => "deployments",
            Res::StatefulSet => "statefulsets",
            Res::Pod => "pods",
            Res::VmPool => "virtualmachinepools",
        }
    }

    /// The kind of objects.
    pub fn kind(self) -> &'static str {
        match self {
            Res::Vm => "VirtualMachine",
            Res::Vmi => "VirtualMachineInstance",
            Res::Deployment => "Deployment",
            Res::StatefulSet => "StatefulSet",
            Res::Pod => "Pod",
            Res::VmPool => "VirtualMachinePool",
        }
    }

    /// Whether it has a `/scale` subresource (and pods the fake's controller keeps).
    pub fn scalable(self) -> bool {
        matches!(self, Res::Deployment | Res::StatefulSet | Res::VmPool)
    }

    /// `plural.group`, as kube-apiserver names a resource in messages.
    pub(crate) fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_string(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    pub(crate) fn from_kind(kind: &str) -> Option<Res> {
        Res::ALL.into_iter().find(|r| r.kind() == kind)
    }

    pub(crate) fn from_parts(group: &str, version: &str, plural: &str) -> Option<Res> {
        Res::ALL
            .into_iter()
            .find(|r| r.group() == group && r.version() == version && r.plural() == plural)
    }
}

/// A scalable workload to create: its kind, name, labels (the opt-in label goes here)
/// and annotations (the activator's settings), replica count, and its pod template's
/// labels (also its selector) and annotations (e.g. a Multus network).
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// Deployment, StatefulSet or VirtualMachinePool.
    pub res: Res,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The workload's labels.
    pub labels: Value,
    /// The workload's annotations.
    pub annotations: Value,
    /// `spec.replicas`.
    pub replicas: u64,
    /// The pod template's labels, which are also the selector.
    pub pod_labels: Value,
    /// The pod template's annotations.
    pub pod_annotations: Value,
    /// The pod template's `runtimeClassName` (e.g. `kata-qemu`), if any.
    pub runtime_class: Option<String>,
}

impl WorkloadSpec {
    /// An opted-in workload at zero replicas whose pods carry `app: {name}`.
    pub fn opted_in(res: Res, namespace: &str, name: &str) -> WorkloadSpec {
        WorkloadSpec {
            res,
            namespace: namespace.to_string(),
            name: name.to_string(),
            labels: json!({"vm-activator.io/enabled": "true"}),
            annotations: json!({}),
            replicas: 0,
            pod_labels: json!({"app": name}),
            pod_annotations: json!({}),
            runtime_class: None,
        }
    }

    /// The object as the API server would be sent it.
    pub fn object(&self) -> Value {
        // No grace period: with no kubelet to confirm, a real API server would keep a
        // deleted pod terminating forever.
        let mut pod_spec = json!({
            "containers": [{"name": "app", "image": "guest"}],
            "terminationGracePeriodSeconds": 0,
        });
        if let Some(class) = &self.runtime_class {
            pod_spec["runtimeClassName"] = json!(class);
        }
        let mut object = json!({
            "apiVersion": self.res.api_version(),
            "kind": self.res.kind(),
            "metadata": {
                "name": self.name, "namespace": self.namespace,
                "labels": self.labels, "annotations": self.annotations,
            },
            "spec": {
                "replicas": self.replicas,
                "selector": {"matchLabels": self.pod_labels},
                "template": {
                    "metadata": {"labels": self.pod_labels, "annotations": self.pod_annotations},
                    "spec": pod_spec,
                },
            },
        });
        match self.res {
            Res::StatefulSet => object["spec"]["serviceName"] = json!(self.name),
            Res::VmPool => {
                // A pool's template is a VirtualMachine's: its pods are virt-launcher pods.
                let template = object["spec"]["template"].take();
                object["spec"]["virtualMachineTemplate"] = json!({
                    "metadata": template["metadata"],
                    "spec": {"runStrategy": "Always", "template": {"metadata": template["metadata"], "spec": {"domain": {"devices": {}}}}},
                });
            }
            _ => {}
        }
        object
    }
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// `Content-Type`, if any.
    pub content_type: String,
    /// The body.
    pub body: String,
    /// The status answered.
    pub status: u16,
}

impl Recorded {
    /// Whether this is a watch (long-lived) request.
    pub fn is_watch(&self) -> bool {
        self.query.split('&').any(|p| p == "watch=true" || p == "watch=1")
    }
    /// Whether this is a successful PATCH of the named VM that halts it.
    pub fn is_applied_stop(&self, namespace: &str, name: &str) -> bool {
        self.is_vm_patch(namespace, name) && self.status == 200 && self.body.contains("Halted")
    }

    /// Whether this is a successful write of the activity annotation on the named VM.
    pub fn is_activity_write(&self, namespace: &str, name: &str) -> bool {
        self.is_vm_patch(namespace, name)
            && self.status == 200
            && self.content_type.starts_with("application/merge-patch+json")
            && self.body.contains("last-activity")
    }

    /// Whether this is a PATCH of the named VM.
    pub fn is_vm_patch(&self, namespace: &str, name: &str) -> bool {
        self.method == "PATCH"
            && self.path == format!("/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}")
    }

    /// Whether this is a PATCH of the named object of kind `res` (not a subresource).
    pub fn is_object_patch(&self, res: Res, namespace: &str, name: &str) -> bool {
        self.method == "PATCH" && self.path == object_path(res, namespace, name)
    }

    /// Whether this is a PATCH of the named workload's `/scale`.
    pub fn is_scale_patch(&self, res: Res, namespace: &str, name: &str) -> bool {
        self.method == "PATCH" && self.path == format!("{}/scale", object_path(res, namespace, name))
    }

    /// Whether this is a list or watch (the activator's reflectors), not a call about one
    /// object.
    pub fn is_list_or_watch(&self) -> bool {
        let segments: Vec<&str> = self.path.trim_start_matches('/').split('/').collect();
        let rest = match segments.first() {
            Some(&"api") => &segments[2.min(segments.len())..],
            _ => &segments[3.min(segments.len())..],
        };
        let rest = match rest.first() {
            Some(&"namespaces") => &rest[2.min(rest.len())..],
            _ => rest,
        };
        self.method == "GET" && (self.is_watch() || rest.len() == 1)
    }

    /// `METHOD resource/name[/sub] (patch type)`, for tables of calls.
    pub fn summary(&self) -> String {
        let parts: Vec<&str> = self.path.rsplit('/').collect();
        let resource = match parts.first() {
            Some(&"scale") => format!("{}/{}/scale", parts[2], parts[1]),
            _ => format!("{}/{}", parts.get(1).unwrap_or(&""), parts[0]),
        };
        let kind = match self.content_type.as_str() {
            t if t.starts_with("application/json-patch+json") => " (JSON patch)",
            t if t.starts_with("application/merge-patch+json") => " (merge patch)",
            _ => "",
        };
        format!("{} {resource}{kind}", self.method)
    }
}

/// The URL path of an object.
pub fn object_path(res: Res, namespace: &str, name: &str) -> String {
    let prefix = match res.group() {
        "" => "/api/v1".to_string(),
        group => format!("/apis/{group}/{}", res.version()),
    };
    format!("{prefix}/namespaces/{namespace}/{}/{name}", res.plural())
}

pub(crate) struct Guest {
    task: JoinHandle<()>,
    /// In front of it, with `Options::guest_behind_proxy`.
    proxy: Option<Arc<fault_proxy::FaultProxy>>,
}

struct Inner {
    addr: SocketAddr,
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    requests: Mutex<Vec<Recorded>>,
    request_seen: Notify,
    options: Mutex<Options>,
    serving: Mutex<Option<JoinHandle<()>>>,
    /// Servers that stopped accepting but still serve the connections they had.
    draining: Mutex<Vec<JoinHandle<()>>>,
    /// While true the server accepts no connection and closes idle ones, as a
    /// terminating kube-apiserver does (see `refuse_new_connections`).
    refusing: tokio::sync::watch::Sender<bool>,
    guests: Mutex<HashMap<(String, String), Guest>>,
    guest_logs: Mutex<HashMap<(String, String), GuestLog>>,
    controller: Mutex<Option<JoinHandle<()>>>,
    /// VMIs the virt-controller created, per VM.
    vmi_creations: Mutex<HashMap<(String, String), usize>>,
    /// Bumped to end every open watch cleanly (as a watch timeout does).
    watch_epoch: tokio::sync::watch::Sender<u64>,
    /// While true, booted guests wait before they start listening (see `hold_guests`).
    guests_held: tokio::sync::watch::Sender<bool>,
    /// Scale patches still to be raced by a status write (see `race_scale_patches`).
    scale_races: std::sync::atomic::AtomicUsize,
    /// Tokens TokenReview authenticates, and their users.
    tokens: Mutex<HashMap<String, String>>,
    /// What SubjectAccessReview allows.
    grants: Mutex<Vec<reviews::Grant>>,
    /// events.k8s.io Events, by namespace and name.
    k8s_events: Mutex<BTreeMap<(String, String), Value>>,
}

/// A VirtualMachine object (no namespace): `spec` merged over `{"runStrategy": "Halted"}`
/// (unless it sets `running`, the deprecated field, itself) and a minimal template (which
/// it may extend, e.g. with Multus `networks`). The fake and the real-cluster harness
/// create the same objects.
pub fn vm_object(name: &str, labels: Value, annotations: Value, spec: Value) -> Value {
    let mut full_spec = if spec.get("running").is_some() {
        json!({})
    } else {
        json!({"runStrategy": "Halted"})
    };
    full_spec["template"] = json!({"spec": {"domain": {"devices": {}}}});
    json_patch::merge(&mut full_spec, &spec);
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": full_spec,
    })
}

/// The name of the VM's first interface on a Multus network, if it has one (what a
/// simulated virt-controller attaches there).
pub fn multus_interface(vm: &Value) -> Option<String> {
    vm["spec"]["template"]["spec"]["networks"]
        .as_array()?
        .iter()
        .find(|network| network["multus"]["networkName"].is_string())
        .and_then(|network| network["name"].as_str())
        .map(str::to_string)
}

/// The fake API server. Dropping it stops everything.
pub struct FakeKube {
    inner: Arc<Inner>,
}

impl FakeKube {
    /// Starts the API server and the simulated virt-controller on a free loopback port.
    pub async fn start(options: Options) -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inner = Arc::new(Inner {
            addr,
            store: Mutex::new(Store::default()),
            changes: broadcast::channel(4096).0,
            requests: Mutex::new(Vec::new()),
            request_seen: Notify::new(),
            options: Mutex::new(options),
            serving: Mutex::new(None),
            draining: Mutex::new(Vec::new()),
            refusing: tokio::sync::watch::channel(false).0,
            scale_races: Default::default(),
            tokens: Default::default(),
            grants: Default::default(),
            k8s_events: Default::default(),
            guests: Mutex::new(HashMap::new()),
            guest_logs: Mutex::new(HashMap::new()),
            controller: Mutex::new(None),
            watch_epoch: tokio::sync::watch::channel(0).0,
            guests_held: tokio::sync::watch::channel(false).0,
            vmi_creations: Mutex::new(HashMap::new()),
        });
        let fake = FakeKube { inner };
        fake.serve(listener);
        let controller = tokio::spawn(virt_controller(Arc::downgrade(&fake.inner)));
        *fake.inner.controller.lock().unwrap() = Some(controller);
        fake
    }

    fn serve(&self, listener: TcpListener) {
        let router = router(self.inner.clone());
        let task = tokio::spawn(api::serve_api(listener, router, self.inner.refusing.subscribe()));
        *self.inner.serving.lock().unwrap() = Some(task);
    }

    /// Listens on the server's address again (once the old listener is gone) and serves.
    async fn serve_again(&self) {
        let listener = loop {
            match TcpListener::bind(self.inner.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        self.serve(listener);
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\n",
            self.inner.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Changes the simulated cluster's timings from now on.
    pub fn set_options(&self, f: impl FnOnce(&mut Options)) {
        f(&mut self.inner.options.lock().unwrap());
    }

    /// The fault proxy in front of a running guest (with `Options::guest_behind_proxy`).
    pub fn guest_proxy(&self, namespace: &str, name: &str) -> Option<Arc<fault_proxy::FaultProxy>> {
        let guests = self.inner.guests.lock().unwrap();
        guests.get(&(namespace.to_string(), name.to_string()))?.proxy.clone()
    }

    /// While `held`, guests that finish booting wait before they listen, however long that
    /// takes (benchmarks hold a cold start open to queue a burst of events behind it).
    pub fn hold_guests(&self, held: bool) {
        self.inner.guests_held.send_replace(held);
    }

    /// Creates a VirtualMachine. `spec` is merged over `{"runStrategy": "Halted"}`
    /// (unless it sets `running`, the deprecated field, itself) and a minimal template
    /// (which it may extend, e.g. with Multus `networks`).
    pub fn create_vm(&self, namespace: &str, name: &str, labels: Value, annotations: Value, spec: Value) {
        let mut object = vm_object(name, labels, annotations, spec);
        object["metadata"]["namespace"] = json!(namespace);
        self.inner.write(Res::Vm, namespace, name, Some(object));
    }

    /// An opted-in VM with these annotations, halted.
    pub fn create_opted_in_vm(&self, namespace: &str, name: &str, annotations: Value) {
        self.create_vm(
            namespace,
            name,
            json!({"vm-activator.io/enabled": "true"}),
            annotations,
            json!({}),
        );
    }

    /// Applies a JSON merge patch to a VirtualMachine, as a client's PATCH would.
    pub fn patch_vm(&self, namespace: &str, name: &str, patch: &Value) {
        let mut vm = self.vm(namespace, name).expect("the VM exists");
        json_patch::merge(&mut vm, patch);
        self.inner.write(Res::Vm, namespace, name, Some(vm));
    }

    /// Creates a scalable workload (Deployment, StatefulSet or VirtualMachinePool) as
    /// `spec` describes it.
    pub fn create_workload(&self, spec: &WorkloadSpec) {
        assert!(spec.res.scalable(), "{:?} has no /scale", spec.res);
        self.inner
            .write(spec.res, &spec.namespace, &spec.name, Some(spec.object()));
    }

    /// A workload (or any object) as JSON.
    pub fn object(&self, res: Res, namespace: &str, name: &str) -> Option<Value> {
        self.inner.get(res, namespace, name)
    }

    /// Sets a workload's replica count by hand, as `kubectl scale` does.
    pub fn scale_by_hand(&self, res: Res, namespace: &str, name: &str, replicas: u64) {
        let mut object = self.inner.get(res, namespace, name).expect("the workload exists");
        object["spec"]["replicas"] = json!(replicas);
        self.inner.write(res, namespace, name, Some(object));
    }

    /// The pods in `namespace`.
    pub fn pods(&self, namespace: &str) -> Vec<Value> {
        self.inner.list(Res::Pod, namespace)
    }

    /// Deletes a pod at once (its guest dies with it); its workload replaces it.
    pub fn kill_pod(&self, namespace: &str, pod: &str) {
        workloads::delete_pod(&self.inner, namespace, pod);
    }

    /// Event ids each pod of a workload accepted (pods named `{workload}-{n}`, gone ones
    /// included).
    pub fn workload_events(&self, namespace: &str, workload: &str) -> BTreeMap<String, Vec<String>> {
        let prefix = format!("pod/{workload}-");
        self.inner
            .guest_logs
            .lock()
            .unwrap()
            .iter()
            .filter(|((ns, key), _)| ns == namespace && key.starts_with(&prefix))
            .map(|((_, key), log)| (key.trim_start_matches("pod/").to_string(), log.lock().unwrap().clone()))
            .collect()
    }

    /// Deletes a VirtualMachine (its VMI follows, as with KubeVirt).
    pub fn delete_vm(&self, namespace: &str, name: &str) {
        self.inner.write(Res::Vm, namespace, name, None);
    }

    /// Sets a VM's `spec.runStrategy` directly, as an operator with kubectl would.
    pub fn set_run_strategy(&self, namespace: &str, name: &str, strategy: &str) {
        let mut vm = self.vm(namespace, name).expect("VM exists");
        vm["spec"]["runStrategy"] = json!(strategy);
        self.inner.write(Res::Vm, namespace, name, Some(vm));
    }

    /// The VM object, if it exists.
    pub fn vm(&self, namespace: &str, name: &str) -> Option<Value> {
        self.inner.get(Res::Vm, namespace, name)
    }

    /// The VMI object, if it exists.
    pub fn vmi(&self, namespace: &str, name: &str) -> Option<Value> {
        self.inner.get(Res::Vmi, namespace, name)
    }

    /// Event ids the VM's guest accepted, over all its boots.
    pub fn guest_events(&self, namespace: &str, name: &str) -> Vec<String> {
        self.inner.guest_log(namespace, name).lock().unwrap().clone()
    }

    /// How many VMIs the simulated virt-controller created for the VM (= times it started).
    pub fn vmi_creations(&self, namespace: &str, name: &str) -> usize {
        let creations = self.inner.vmi_creations.lock().unwrap();
        creations
            .get(&(namespace.to_string(), name.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// How many recorded requests match.
    pub fn count(&self, predicate: impl Fn(&Recorded) -> bool) -> usize {
        self.inner
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| predicate(r))
            .count()
    }

    /// Waits until a request matching `predicate` has been received (at any time) and
    /// returns it; panics naming `what` if none arrives within `limit`.
    pub async fn expect_request(&self, what: &str, limit: Duration, predicate: impl Fn(&Recorded) -> bool) -> Recorded {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.inner.request_seen.notified();
            if let Some(r) = self.inner.requests.lock().unwrap().iter().find(|r| predicate(r)) {
                return r.clone();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("expected request never came: {what}\nreceived:\n{:#?}", self.requests());
            }
        }
    }

    /// Takes the API server down (open connections, watches included, are cut) or brings
    /// it back on the same address. The simulated cluster keeps running meanwhile.
    pub async fn set_down(&self, down: bool) {
        if down {
            if let Some(task) = self.inner.serving.lock().unwrap().take() {
                task.abort();
            }
        } else {
            self.serve_again().await;
        }
    }

    /// The VM's guest crashes: its application is gone at once and its VMI is removed;
    /// a VM that should run gets a new VMI and boots again (as virt-controller does for
    /// `runStrategy: Always`).
    pub fn crash_vm(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if let Some(guest) = self.inner.guests.lock().unwrap().remove(&key) {
            guest.task.abort();
        }
        self.inner.write(Res::Vmi, namespace, name, None);
    }

    /// As a kube-apiserver shutting down gracefully: stops accepting connections (new
    /// ones are refused) and closes idle keep-alive ones, while requests in progress —
    /// open watches — go on. `false` accepts again on the same address.
    pub async fn refuse_new_connections(&self, refuse: bool) {
        self.inner.refusing.send_replace(refuse);
        if refuse {
            if let Some(task) = self.inner.serving.lock().unwrap().take() {
                self.inner.draining.lock().unwrap().push(task);
            }
        } else {
            self.serve_again().await;
        }
    }

    /// The Kubernetes Events recorded in `namespace` (events.k8s.io/v1 objects), oldest
    /// first.
    pub fn k8s_events(&self, namespace: &str) -> Vec<Value> {
        let mut events: Vec<Value> = self
            .inner
            .k8s_events
            .lock()
            .unwrap()
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|(_, event)| event.clone())
            .collect();
        events.sort_by_key(|e| e["eventTime"].as_str().unwrap_or_default().to_string());
        events
    }

    /// TokenReview authenticates `token` as `user` from now on.
    pub fn add_token(&self, token: &str, user: &str) {
        self.inner.tokens.lock().unwrap().insert(token.into(), user.into());
    }

    /// SubjectAccessReview allows `user` to `update` `resource/subresource` of `group`
    /// in `namespace` from now on.
    pub fn grant(&self, user: &str, namespace: &str, group: &str, resource: &str, subresource: &str) {
        self.inner.grants.lock().unwrap().push(reviews::Grant {
            user: user.into(),
            verb: "update".into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
        });
    }

    /// The next `count` PATCHes of a `/scale` each lose a race with a controller writing
    /// the workload's status just before: the object's resourceVersion moves on, so a
    /// patch carrying the one it read gets 409 — what a real Deployment controller does
    /// to a scale-up that follows its scale-down closely.
    pub fn race_scale_patches(&self, count: usize) {
        self.inner.scale_races.store(count, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forgets the event history (etcd compaction) and ends every open watch cleanly,
    /// as a watch timeout does: a client resuming from its last version gets 410 Gone
    /// and must re-list.
    pub fn compact(&self) {
        {
            let mut store = self.inner.store.lock().unwrap();
            // Writes to other resources advance the revision; etcd then compacts at it.
            store.rv += 1;
            store.compacted = store.rv;
            store.history.clear();
        }
        self.inner.watch_epoch.send_modify(|e| *e += 1);
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        for slot in [&self.inner.serving, &self.inner.controller] {
            if let Some(task) = slot.lock().unwrap().take() {
                task.abort();
            }
        }
        for task in self.inner.draining.lock().unwrap().drain(..) {
            task.abort();
        }
        for (_, guest) in self.inner.guests.lock().unwrap().drain() {
            guest.task.abort();
        }
    }
}
