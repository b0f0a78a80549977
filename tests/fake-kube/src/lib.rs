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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};
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

type Key = (Res, String, String);

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    res: Res,
    kind: &'static str,
    object: Value,
    old: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Watches from versions older than this get 410 Gone.
    compacted: u64,
}

/// Event ids one VM's guest accepted, over all its boots.
type GuestLog = Arc<Mutex<Vec<String>>>;

struct Guest {
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

/// Addresses handed to VMIs: 127.1.x.y (y in 1..=254), unique within the process.
static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// Binds (without listening) the next free VMI address on `port`, skipping any that
/// another process holds.
fn reserve_guest_socket(port: u16) -> Option<tokio::net::TcpSocket> {
    for _ in 0..1024 {
        let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(127, 1, (n / 254 % 256) as u8, (n % 254 + 1) as u8);
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.set_reuseaddr(true).ok()?;
        if socket.bind(SocketAddr::new(IpAddr::V4(ip), port)).is_ok() {
            return Some(socket);
        }
    }
    None
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

impl Inner {
    fn get(&self, res: Res, namespace: &str, name: &str) -> Option<Value> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .get(&(res, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Creates, replaces (`Some`) or deletes (`None`) an object, bumping resourceVersion.
    fn write(&self, res: Res, namespace: &str, name: &str, object: Option<Value>) -> Option<Value> {
        let mut store = self.store.lock().unwrap();
        let key = (res, namespace.to_string(), name.to_string());
        let old = store.objects.get(&key).cloned();
        store.rv += 1;
        let rv = store.rv;
        let (kind, object) = match object {
            Some(mut object) => {
                object["metadata"]["managedFields"] = managed_fields(&object);
                let meta = &mut object["metadata"];
                meta["resourceVersion"] = json!(rv.to_string());
                match &old {
                    Some(old) => {
                        meta["uid"] = old["metadata"]["uid"].clone();
                        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                        let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
                        let spec_changed = old.get("spec") != object.get("spec");
                        object["metadata"]["generation"] = json!(generation + u64::from(spec_changed));
                    }
                    None => {
                        meta["uid"] = json!(format!("uid-{rv}"));
                        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                        meta["generation"] = json!(1);
                    }
                }
                store.objects.insert(key, object.clone());
                (if old.is_some() { "MODIFIED" } else { "ADDED" }, object)
            }
            None => {
                let mut object = store.objects.remove(&key)?;
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                ("DELETED", object)
            }
        };
        let change = Change {
            rv,
            res,
            kind,
            object: object.clone(),
            old,
        };
        store.history.push_back(change.clone());
        if store.history.len() > 10_000 {
            store.history.pop_front();
            store.compacted = store.history.front().map(|c| c.rv - 1).unwrap_or(rv);
        }
        drop(store);
        let _ = self.changes.send(change);
        Some(object)
    }

    fn guest_log(&self, namespace: &str, name: &str) -> GuestLog {
        self.guest_logs
            .lock()
            .unwrap()
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .clone()
    }

    fn record(&self, recorded: Recorded) {
        self.requests.lock().unwrap().push(recorded);
        self.request_seen.notify_waiters();
    }
}

// ---------------------------------------------------------------- HTTP

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/apis/kubevirt.io/v1/{plural}", get(list_or_watch_all))
        .route(
            "/apis/kubevirt.io/v1/namespaces/{ns}/{plural}",
            get(list_or_watch_namespaced),
        )
        .route(
            "/apis/kubevirt.io/v1/namespaces/{ns}/{plural}/{name}",
            get(get_object).patch(patch_object).delete(delete_object),
        )
        .route(
            "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/{name}/{action}",
            put(vmi_subresource),
        )
        .fallback(|| async { status(404, "NotFound", "the server could not find the requested resource") })
        .layer(axum::middleware::from_fn_with_state(inner.clone(), record_requests))
        .with_state(inner)
}

/// Records every request (with its body) and the status it got.
async fn record_requests(State(inner): State<Arc<Inner>>, request: Request, next: axum::middleware::Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let mut recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
        status: 0,
    };
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    recorded.status = response.status().as_u16();
    inner.record(recorded);
    response
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn not_found(res: Res, name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("{}.kubevirt.io \"{name}\" not found", res.plural()),
    )
}

type Params = Query<HashMap<String, String>>;

async fn list_or_watch_all(
    State(inner): State<Arc<Inner>>,
    UrlPath(plural): UrlPath<String>,
    Query(q): Params,
) -> Response {
    list_or_watch(inner, None, &plural, q).await
}

async fn list_or_watch_namespaced(
    State(inner): State<Arc<Inner>>,
    UrlPath((ns, plural)): UrlPath<(String, String)>,
    Query(q): Params,
) -> Response {
    list_or_watch(inner, Some(ns), &plural, q).await
}

async fn list_or_watch(inner: Arc<Inner>, ns: Option<String>, plural: &str, q: HashMap<String, String>) -> Response {
    let Some(res) = Res::from_plural(plural) else {
        return status(404, "NotFound", "the server could not find the requested resource");
    };
    let selector = match Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &format!("unable to parse requirement: {e}")),
    };
    let rv = q.get("resourceVersion").cloned().unwrap_or_default();
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        return watch(inner, res, ns, selector, rv, bookmarks, timeout);
    }
    let store = inner.store.lock().unwrap();
    if let Ok(asked) = rv.parse::<u64>() {
        if asked > 0 && asked < store.compacted && q.get("resourceVersionMatch").is_some_and(|m| m == "Exact") {
            return status(
                410,
                "Expired",
                &format!("too old resource version: {asked} ({})", store.compacted),
            );
        }
    }
    // Pagination as kube-apiserver does it: `limit` pages through a consistent list
    // (served from etcd) with an opaque `continue` token; with `resourceVersion=0` the
    // list is served from the watch cache, which ignores `limit` and returns everything.
    let continue_from = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match token.split('|').collect::<Vec<_>>().as_slice() {
            [rv, after_ns, after_name] if rv.parse::<u64>().is_ok_and(|rv| rv >= store.compacted) => {
                Some((rv.to_string(), (after_ns.to_string(), after_name.to_string())))
            }
            _ => {
                return status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                )
            }
        },
        None => None,
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0 && rv != "0");
    let list_rv = continue_from
        .as_ref()
        .map(|(rv, _)| rv.clone())
        .unwrap_or_else(|| store.rv.to_string());
    let mut matching = store
        .objects
        .iter()
        .filter(|((r, n, _), o)| *r == res && ns.as_ref().is_none_or(|ns| ns == n) && selector.matches(o))
        .filter(|((_, n, name), _)| {
            continue_from
                .as_ref()
                .is_none_or(|(_, (after_ns, after_name))| (n, name) > (after_ns, after_name))
        });
    let mut items = Vec::new();
    let mut last_key = None;
    for ((_, n, name), object) in matching.by_ref() {
        items.push(object.clone());
        last_key = Some(format!("{n}|{name}"));
        if limit.is_some_and(|l| items.len() >= l) {
            break;
        }
    }
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": list_rv});
    if remaining > 0 {
        if let Some(key) = last_key {
            metadata["continue"] = json!(format!("{list_rv}|{key}"));
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let body = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": format!("{}List", res.kind()),
        "metadata": metadata,
        "items": items,
    });
    axum::Json(body).into_response()
}

/// A watch: replays history after `rv` (or synthetic ADDED for `rv` 0/empty), then
/// live changes, with bookmarks, until the timeout or the client leaves.
fn watch(
    inner: Arc<Inner>,
    res: Res,
    ns: Option<String>,
    selector: Selector,
    rv: String,
    bookmarks: bool,
    timeout: Duration,
) -> Response {
    let mut live = inner.changes.subscribe();
    let mut epoch = inner.watch_epoch.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let in_scope = move |r: Res, o: &Value| r == res && ns.as_deref().is_none_or(|ns| o["metadata"]["namespace"] == ns);
    let line = |kind: &str, object: &Value| Ok(Bytes::from(format!("{}\n", json!({"type": kind, "object": object}))));
    let (initial, mut last_rv) = {
        let store = inner.store.lock().unwrap();
        match rv.parse::<u64>().unwrap_or(0) {
            0 => {
                let lines: Vec<_> = store
                    .objects
                    .iter()
                    .filter(|((r, _, _), o)| in_scope(*r, o) && selector.matches(o))
                    .map(|(_, o)| line("ADDED", o))
                    .collect();
                (lines, store.rv)
            }
            asked if asked < store.compacted => {
                let gone = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {asked} ({})", store.compacted),
                    "reason": "Expired", "code": 410,
                });
                (vec![line("ERROR", &gone)], u64::MAX)
            }
            asked => {
                let lines: Vec<_> = store
                    .history
                    .iter()
                    .filter(|c| c.rv > asked && in_scope(c.res, &c.object))
                    .filter_map(|c| selected(c, &selector).map(|kind| line(kind, &c.object)))
                    .collect();
                (lines, store.rv)
            }
        }
    };
    let bookmark_every = inner.options.lock().unwrap().bookmark_interval;
    let store_inner = inner.clone();
    tokio::spawn(async move {
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if last_rv == u64::MAX {
            return; // 410: the client re-lists.
        }
        let deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        loop {
            let next = tokio::select! {
                change = live.recv() => match change {
                    Ok(c) => Some(c),
                    // Fell behind the broadcast buffer: end the watch, the client resumes.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => None,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = epoch.changed() => return,
                _ = tx.closed() => return,
            };
            let sent = match next {
                Some(c) if c.rv > last_rv && in_scope(c.res, &c.object) => {
                    last_rv = c.rv;
                    match selected(&c, &selector) {
                        Some(kind) => tx.send(line(kind, &c.object)).await,
                        None => Ok(()),
                    }
                }
                Some(_) => Ok(()),
                None => {
                    let rv = store_inner.store.lock().unwrap().rv.max(last_rv);
                    let mark = json!({"apiVersion": "kubevirt.io/v1", "kind": res.kind(), "metadata": {"resourceVersion": rv.to_string()}});
                    tx.send(line("BOOKMARK", &mark)).await
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap()
}

/// The event type a watch with `selector` sees for a change, if any: objects entering
/// the selector are ADDED, leaving it DELETED.
fn selected(c: &Change, selector: &Selector) -> Option<&'static str> {
    let now = selector.matches(&c.object) && c.kind != "DELETED";
    let before = c.old.as_ref().is_some_and(|o| selector.matches(o));
    match (before, now) {
        (_, true) if c.kind == "ADDED" => Some("ADDED"),
        (true, true) => Some("MODIFIED"),
        (false, true) => Some("ADDED"),
        (true, false) => Some("DELETED"),
        (false, false) if c.kind == "DELETED" && selector.matches(&c.object) => Some("DELETED"),
        (false, false) => None,
    }
}

async fn get_object(
    State(inner): State<Arc<Inner>>,
    UrlPath((ns, plural, name)): UrlPath<(String, String, String)>,
) -> Response {
    let Some(res) = Res::from_plural(&plural) else {
        return status(404, "NotFound", "the server could not find the requested resource");
    };
    match inner.get(res, &ns, &name) {
        Some(object) => axum::Json(object).into_response(),
        None => not_found(res, &name),
    }
}

async fn delete_object(
    State(inner): State<Arc<Inner>>,
    UrlPath((ns, plural, name)): UrlPath<(String, String, String)>,
) -> Response {
    let Some(res) = Res::from_plural(&plural) else {
        return status(404, "NotFound", "the server could not find the requested resource");
    };
    match inner.write(res, &ns, &name, None) {
        Some(object) => axum::Json(object).into_response(),
        None => not_found(res, &name),
    }
}

async fn patch_object(
    State(inner): State<Arc<Inner>>,
    UrlPath((ns, plural, name)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(res) = Res::from_plural(&plural) else {
        return status(404, "NotFound", "the server could not find the requested resource");
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == "application/strategic-merge-patch+json" {
        return status(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body of the request is not valid JSON");
    };
    // Read, patch and write under one lock so concurrent patches serialise as in etcd.
    let _serial = PATCH_LOCK.lock().await;
    let Some(mut object) = inner.get(res, &ns, &name) else {
        return not_found(res, &name);
    };
    let original_rv = object["metadata"]["resourceVersion"].clone();
    match media {
        "application/merge-patch+json" => {
            if let Some(wanted) = patch.pointer("/metadata/resourceVersion") {
                if *wanted != original_rv {
                    return status(
                        409,
                        "Conflict",
                        &format!("Operation cannot be fulfilled on {}.kubevirt.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again", res.plural()),
                    );
                }
            }
            json_patch::merge(&mut object, &patch);
        }
        "application/json-patch+json" => {
            let ops: json_patch::Patch = match serde_json::from_value(patch) {
                Ok(ops) => ops,
                Err(e) => return status(400, "BadRequest", &format!("invalid JSON patch: {e}")),
            };
            if let Err(e) = json_patch::patch(&mut object, &ops) {
                return status(
                    422,
                    "Invalid",
                    &format!("the server rejected our request due to an error in our request: {e}"),
                );
            }
        }
        _ => {
            return status(
                415,
                "UnsupportedMediaType",
                &format!("unsupported patch content type {content_type:?}"),
            )
        }
    }
    if object["metadata"]["name"] != name.as_str() || object["metadata"]["namespace"] != ns.as_str() {
        return status(422, "Invalid", "metadata.name and metadata.namespace cannot be changed");
    }
    // KubeVirt's admission webhook.
    if res == Res::Vm
        && object["spec"].get("running").is_some_and(|r| !r.is_null())
        && object["spec"].get("runStrategy").is_some_and(|r| !r.is_null())
    {
        return status(
            422,
            "Invalid",
            "admission webhook \"virtualmachine-validator.kubevirt.io\" denied the request: Running and RunStrategy are mutually exclusive",
        );
    }
    strip_nulls(&mut object);
    match inner.write(res, &ns, &name, Some(object)) {
        Some(written) => axum::Json(written).into_response(),
        None => not_found(res, &name),
    }
}

static PATCH_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        for v in map.values_mut() {
            strip_nulls(v);
        }
    }
}

async fn vmi_subresource(
    State(inner): State<Arc<Inner>>,
    UrlPath((ns, name, action)): UrlPath<(String, String, String)>,
) -> Response {
    let Some(mut vmi) = inner.get(Res::Vmi, &ns, &name) else {
        return not_found(Res::Vmi, &name);
    };
    let paused = vmi["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Paused"));
    match (action.as_str(), paused) {
        ("pause", false) => {
            let conditions = vmi["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut conditions = conditions;
            conditions.push(json!({"type": "Paused", "status": "True"}));
            vmi["status"]["conditions"] = json!(conditions);
        }
        ("unpause", true) => {
            let conditions: Vec<Value> = vmi["status"]["conditions"]
                .as_array()
                .map(|c| c.iter().filter(|c| c["type"] != "Paused").cloned().collect())
                .unwrap_or_default();
            vmi["status"]["conditions"] = json!(conditions);
        }
        ("pause", true) => return status(409, "Conflict", "VMI is already paused"),
        ("unpause", false) => return status(409, "Conflict", "VMI is not paused"),
        _ => return status(404, "NotFound", "the server could not find the requested resource"),
    }
    inner.write(Res::Vmi, &ns, &name, Some(vmi));
    StatusCode::OK.into_response()
}

/// Serves `router` on `listener`; aborting the task cuts every connection it accepted.
async fn serve_router(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        connections.spawn(async move {
            let service = hyper_service(router);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

fn hyper_service(router: Router) -> hyper_util::service::TowerToHyperService<Router> {
    hyper_util::service::TowerToHyperService::new(router)
}

// ---------------------------------------------------------------- label selectors

#[derive(Clone, Debug, Default)]
struct Selector(Vec<Requirement>);

#[derive(Clone, Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    fn parse(text: &str) -> Result<Selector, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else if part.contains(' ') {
                return Err(format!("set-based requirement {part:?} is not supported by the fake"));
            } else {
                Requirement::Exists(part.into())
            };
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        })
    }
}

// ---------------------------------------------------------------- virt-controller

fn wants_running(vm: &Value) -> bool {
    match vm["spec"]["runStrategy"].as_str() {
        Some("Always" | "RerunOnFailure" | "Once") => true,
        Some(_) => false,
        None => vm["spec"]["running"].as_bool() == Some(true),
    }
}

async fn virt_controller(inner: std::sync::Weak<Inner>) {
    let Some(mut changes) = inner.upgrade().map(|i| i.changes.subscribe()) else {
        return;
    };
    loop {
        let change = match changes.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if change.res != Res::Vm {
            continue;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let ns = change.object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = change.object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        reconcile(&inner, &ns, &name);
    }
}

fn reconcile(inner: &Arc<Inner>, ns: &str, name: &str) {
    let vm = inner.get(Res::Vm, ns, name);
    let vmi = inner.get(Res::Vmi, ns, name);
    let desired = vm.as_ref().is_some_and(wants_running);
    let options = inner.options.lock().unwrap().clone();
    match (desired, vmi) {
        (true, None) => {
            let vm = vm.expect("desired implies the VM exists");
            let port = vm["metadata"]["annotations"]["vm-activator.io/port"]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or(8080u16);
            let vmi = json!({
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {
                    "name": name, "namespace": ns,
                    "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name, "uid": vm["metadata"]["uid"], "controller": true}],
                },
                "spec": {"domain": {"devices": {}}},
                "status": {"phase": "Pending"},
            });
            let created = inner.write(Res::Vmi, ns, name, Some(vmi)).expect("created");
            *inner
                .vmi_creations
                .lock()
                .unwrap()
                .entry((ns.to_string(), name.to_string()))
                .or_default() += 1;
            let uid = created["metadata"]["uid"].clone();
            tokio::spawn(boot(
                Arc::downgrade(inner),
                ns.to_string(),
                name.to_string(),
                uid,
                port,
                options,
            ));
        }
        (false, Some(_)) => {
            let (inner, ns, name) = (Arc::downgrade(inner), ns.to_string(), name.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(options.stop_delay).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                if let Some(guest) = inner.guests.lock().unwrap().remove(&(ns.clone(), name.clone())) {
                    guest.task.abort();
                }
                let still_halted = inner.get(Res::Vm, &ns, &name).is_none_or(|vm| !wants_running(&vm));
                if still_halted {
                    inner.write(Res::Vmi, &ns, &name, None);
                }
            });
        }
        _ => {}
    }
}

/// `metadata.managedFields` as kube-apiserver keeps it: every object carries a
/// FieldsV1 tree of the fields its manager set (often larger than the rest of the
/// object's metadata), so a client that caches whole objects pays for it.
fn managed_fields(object: &Value) -> Value {
    fn tree(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, child)| (format!("f:{key}"), tree(child)))
                    .collect(),
            ),
            _ => json!({}),
        }
    }
    let meta = &object["metadata"];
    let fields = json!({
        "f:metadata": {
            "f:labels": tree(&meta["labels"]),
            "f:annotations": tree(&meta["annotations"]),
        },
        "f:spec": tree(&object["spec"]),
        "f:status": tree(&object["status"]),
    });
    json!([{
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "apiVersion": object["apiVersion"],
        "time": "2026-01-01T00:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }])
}

/// Pending → Scheduled → Running (with an IP), then the guest starts listening.
async fn boot(inner: std::sync::Weak<Inner>, ns: String, name: String, uid: Value, port: u16, options: Options) {
    let step = |phase: &str, ip: Option<IpAddr>| {
        let Some(inner) = inner.upgrade() else {
            return false;
        };
        let Some(mut vmi) = inner.get(Res::Vmi, &ns, &name) else {
            return false;
        };
        if vmi["metadata"]["uid"] != uid {
            return false;
        }
        vmi["status"]["phase"] = json!(phase);
        if let Some(ip) = ip {
            vmi["status"]["interfaces"] = json!([{"name": "default", "ipAddress": ip.to_string()}]);
        }
        inner.write(Res::Vmi, &ns, &name, Some(vmi));
        true
    };
    tokio::time::sleep(options.schedule_delay).await;
    if !step("Scheduled", None) {
        return;
    }
    tokio::time::sleep(options.running_delay).await;
    // The VMI's address is bound from now on (so no other server can answer for it), but
    // refuses connections until the guest application listens after `guest_delay`.
    let Some(socket) = reserve_guest_socket(port) else {
        return;
    };
    let ip = socket.local_addr().expect("bound").ip();
    if !step("Running", Some(ip)) {
        return;
    }
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let log = strong.guest_log(&ns, &name);
    let guest_delay = options.guest_delay;
    let mut held = strong.guests_held.subscribe();
    let task = tokio::spawn(async move {
        tokio::time::sleep(guest_delay).await;
        let _ = held.wait_for(|held| !*held).await;
        let Ok(listener) = socket.listen(1024) else {
            return;
        };
        serve_router(listener, guest_router(log)).await;
    });
    strong.guests.lock().unwrap().insert((ns, name), Guest { task });
}

/// The guest application: accepts CloudEvents with 202 and lists their ids.
fn guest_router(log: GuestLog) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/events",
            get({
                let log = log.clone();
                move || async move { log.lock().unwrap().join("\n") }
            }),
        )
        .fallback(move |method: Method, headers: HeaderMap, body: Bytes| {
            let log = log.clone();
            async move {
                if method != Method::POST {
                    return StatusCode::OK;
                }
                let id = headers
                    .get("ce-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| {
                        serde_json::from_slice::<Value>(&body)
                            .ok()?
                            .get("id")?
                            .as_str()
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                log.lock().unwrap().push(id);
                StatusCode::ACCEPTED
            }
        })
}
