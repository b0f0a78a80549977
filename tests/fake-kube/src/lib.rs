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
pub mod guest;
mod list_watch;
mod selector;
mod store;
mod virt_controller;

use api::{router, serve_router};
use guest::GuestLog;
use store::{Change, Store};
use virt_controller::virt_controller;

use std::collections::HashMap;
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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            schedule_delay: Duration::from_millis(20),
            running_delay: Duration::from_millis(30),
            guest_delay: Duration::from_millis(100),
            stop_delay: Duration::from_millis(20),
            bookmark_interval: Duration::from_millis(500),
        }
    }
}

/// The two resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Res {
    /// `virtualmachines`
    Vm,
    /// `virtualmachineinstances`
    Vmi,
}

impl Res {
    fn plural(self) -> &'static str {
        match self {
            Res::Vm => "virtualmachines",
            Res::Vmi => "virtualmachineinstances",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Res::Vm => "VirtualMachine",
            Res::Vmi => "VirtualMachineInstance",
        }
    }
    fn from_plural(plural: &str) -> Option<Res> {
        match plural {
            "virtualmachines" => Some(Res::Vm),
            "virtualmachineinstances" => Some(Res::Vmi),
            _ => None,
        }
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
}

pub(crate) struct Guest {
    task: JoinHandle<()>,
}

struct Inner {
    addr: SocketAddr,
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    requests: Mutex<Vec<Recorded>>,
    request_seen: Notify,
    options: Mutex<Options>,
    serving: Mutex<Option<JoinHandle<()>>>,
    guests: Mutex<HashMap<(String, String), Guest>>,
    guest_logs: Mutex<HashMap<(String, String), GuestLog>>,
    controller: Mutex<Option<JoinHandle<()>>>,
    /// VMIs the virt-controller created, per VM.
    vmi_creations: Mutex<HashMap<(String, String), usize>>,
    /// Bumped to end every open watch cleanly (as a watch timeout does).
    watch_epoch: tokio::sync::watch::Sender<u64>,
    /// While true, booted guests wait before they start listening (see `hold_guests`).
    guests_held: tokio::sync::watch::Sender<bool>,
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
        let task = tokio::spawn(serve_router(listener, router));
        *self.inner.serving.lock().unwrap() = Some(task);
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

    /// While `held`, guests that finish booting wait before they listen, however long that
    /// takes (benchmarks hold a cold start open to queue a burst of events behind it).
    pub fn hold_guests(&self, held: bool) {
        self.inner.guests_held.send_replace(held);
    }

    /// Creates a VirtualMachine. `spec` is merged over `{"runStrategy": "Halted"}`
    /// unless it sets `running` (the deprecated field) itself.
    pub fn create_vm(&self, namespace: &str, name: &str, labels: Value, annotations: Value, spec: Value) {
        let mut full_spec = if spec.get("running").is_some() {
            json!({})
        } else {
            json!({"runStrategy": "Halted"})
        };
        json_patch::merge(&mut full_spec, &spec);
        full_spec["template"] = json!({"spec": {"domain": {"devices": {}}}});
        let object = json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
            "spec": full_spec,
        });
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
            let listener = loop {
                match TcpListener::bind(self.inner.addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            self.serve(listener);
        }
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
        for (_, guest) in self.inner.guests.lock().unwrap().drain() {
            guest.task.abort();
        }
    }
}
