//! The KubeVirt backend: VirtualMachines carrying the opt-in label
//! `vm-activator.io/enabled=true` and their VirtualMachineInstances, kept in
//! watch-driven reflector stores — readiness is event-driven, never polled. Starts and
//! stops by JSON merge patch of `spec.runStrategy` (`Always` / `Halted`; a VM still on
//! the deprecated `spec.running` gets `running: null` in the same patch — CRDs do not
//! accept strategic-merge patches). Pause/unpause through `subresources.kubevirt.io`
//! when enabled. Endpoint = VMI `status.interfaces[0].ipAddress` + the VM's port.
//!
//! Owns: everything Kubernetes. The only module that imports kube.
//! Must not import `activator`, `ingress`, `server`, `gate`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, CustomResource, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Backend, BackendError, BackendPhase, BackendStatus, Catalog, StopOutcome};
use crate::config::KubevirtConfig;
use crate::vm::{Policy, VmKey, LAST_ACTIVITY_ANNOTATION, OPT_IN_LABEL};

/// Every Kubernetes API permission the backend uses: `(API group, resource, verbs)`.
/// `deploy/base/rbac.yaml` grants exactly these (a test checks it, and the end-to-end
/// tests check that every request they observe is covered). `get` is for re-reading a
/// VM after a failed compare-and-stop. Pausing needs the extra
/// [`PAUSE_API_ACCESS`] (the `deploy/components/pause` component).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("kubevirt.io", "virtualmachines", &["get", "list", "watch", "patch"]),
    ("kubevirt.io", "virtualmachineinstances", &["get", "list", "watch"]),
];

/// Extra permissions for `kubevirt.pause: true`.
pub const PAUSE_API_ACCESS: &[(&str, &str, &[&str])] = &[
    ("subresources.kubevirt.io", "virtualmachineinstances/pause", &["update"]),
    (
        "subresources.kubevirt.io",
        "virtualmachineinstances/unpause",
        &["update"],
    ),
];

/// The parts of a KubeVirt `VirtualMachine` spec the activator reads and patches.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachine",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// `Always`, `Halted`, `Manual`, `RerunOnFailure`, `Once`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_strategy: Option<String>,
    /// Deprecated predecessor of `runStrategy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<bool>,
}

/// The parts of a KubeVirt `VirtualMachineInstance` the activator reads.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachineInstance",
    namespaced,
    status = "VmiStatus",
    schema = "disabled"
)]
pub struct VmiSpec {}

/// `VirtualMachineInstance.status`, the fields used.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    /// `Pending`, `Scheduling`, `Scheduled`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Network interfaces; the first one's address is the guest's.
    #[serde(default)]
    pub interfaces: Vec<VmiInterface>,
    /// Conditions (`Ready`, `Paused`, ...).
    #[serde(default)]
    pub conditions: Vec<VmiCondition>,
}

/// One VMI network interface.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiInterface {
    /// The interface's primary IP address.
    #[serde(default)]
    pub ip_address: Option<String>,
}

/// One VMI condition.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct VmiCondition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
}

/// Retry delays for a watch that lost the API server: 250 ms doubling to at most 5 s,
/// each shortened by up to a quarter at random so replicas do not retry in step. (kube's
/// default grows to 30 s, which would keep `/readyz` failing long after the API is back.)
struct ReconnectBackoff {
    next: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Default for ReconnectBackoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Iterator for ReconnectBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // Cheap jitter from the clock's sub-second nanoseconds; no RNG needed for this.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = delay.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Some(delay - jitter)
    }
}

/// How long a stop may take before it is reported as failed.
const STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// The KubeVirt backend.
pub struct KubevirtBackend {
    client: Client,
    config: KubevirtConfig,
    vms: Store<VirtualMachine>,
    vmis: Store<VirtualMachineInstance>,
    catalog: watch::Sender<Catalog>,
    statuses: Mutex<HashMap<VmKey, watch::Sender<BackendStatus>>>,
    health: Arc<Health>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Whether both watches are synced: /readyz reports it.
#[derive(Default)]
struct Health {
    vms_synced: AtomicBool,
    vmis_synced: AtomicBool,
}

impl KubevirtBackend {
    /// Builds a client (from `--kubeconfig`, `KUBECONFIG`, `~/.kube/config` or the
    /// in-cluster service account) and starts the two watches. Does not wait for the API
    /// server: until it answers, `/readyz` fails and starts are refused with 503.
    pub async fn connect(config: KubevirtConfig) -> Result<Arc<KubevirtBackend>, BackendError> {
        let kube_config = match &config.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| BackendError::Unavailable(format!("kubeconfig {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| BackendError::Unavailable(format!("kubeconfig {}: {e}", path.display())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| BackendError::Unavailable(format!("no Kubernetes credentials: {e}")))?,
        };
        let client = Client::try_from(kube_config).map_err(|e| BackendError::Unavailable(e.to_string()))?;
        Ok(Self::start(client, config))
    }

    /// Starts the watches with an existing client.
    pub fn start(client: Client, config: KubevirtConfig) -> Arc<KubevirtBackend> {
        let (vms, vm_writer) = reflector::store();
        let (vmis, vmi_writer) = reflector::store();
        let backend = Arc::new(KubevirtBackend {
            client: client.clone(),
            config,
            vms,
            vmis,
            catalog: watch::channel(Arc::new(BTreeMap::new())).0,
            statuses: Mutex::new(HashMap::new()),
            health: Arc::new(Health::default()),
            tasks: Mutex::new(Vec::new()),
        });
        let vm_task = tokio::spawn(drive(Arc::downgrade(&backend), vm_writer, Kind::Vm, |b: &Self| {
            b.watch_all::<VirtualMachine>(Some(format!("{OPT_IN_LABEL}=true")))
        }));
        let vmi_task = tokio::spawn(drive(Arc::downgrade(&backend), vmi_writer, Kind::Vmi, |b: &Self| {
            b.watch_all::<VirtualMachineInstance>(None)
        }));
        backend.tasks.lock().expect("tasks lock").extend([vm_task, vmi_task]);
        backend
    }

    /// One watcher per configured namespace (or one cluster-wide), merged.
    fn watch_all<K>(&self, labels: Option<String>) -> WatchStream<K>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        // MostRecent: the initial list is paginated (500 objects a page, from etcd), so
        // thousands of VMs are never one response held in memory at once; `Any` would be
        // served from the watch cache, which ignores the page size.
        let mut wc = watcher::Config::default().list_semantic(watcher::ListSemantic::MostRecent);
        if let Some(labels) = &labels {
            wc = wc.labels(labels);
        }
        let apis: Vec<Api<K>> = if self.config.namespaces.is_empty() {
            vec![Api::all(self.client.clone())]
        } else {
            self.config
                .namespaces
                .iter()
                .map(|ns| Api::namespaced(self.client.clone(), ns))
                .collect()
        };
        futures_util::stream::select_all(
            apis.into_iter()
                .map(move |api| watcher(api, wc.clone()).modify(keep_what_is_read).boxed()),
        )
        .boxed()
    }

    fn vm(&self, key: &VmKey) -> Option<Arc<VirtualMachine>> {
        self.vms.get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    fn vm_api(&self, key: &VmKey) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), &key.namespace)
    }

    /// Rebuilds the catalog from the VM store (after a (re-)list); publishes it if it
    /// changed. Unchanged policies keep their `Arc`, shared with the gates.
    fn refresh_catalog(&self) {
        let current = self.catalog.borrow().clone();
        let catalog: BTreeMap<VmKey, Arc<Policy>> = self
            .vms
            .state()
            .iter()
            .filter_map(|vm| {
                let key = VmKey::new(vm.namespace()?, vm.name_any());
                let policy = policy_of(vm);
                let policy = match current.get(&key) {
                    Some(same) if **same == policy => same.clone(),
                    _ => {
                        log_warnings(&key, &policy);
                        Arc::new(policy)
                    }
                };
                Some((key, policy))
            })
            .collect();
        self.catalog.send_if_modified(|current| {
            if **current == catalog {
                return false;
            }
            *current = Arc::new(catalog);
            true
        });
    }

    /// Updates one VM's catalog entry after a watch event: O(log n), not a rebuild, so
    /// activity annotations written on thousands of VMs cost little.
    fn refresh_catalog_entry(&self, key: &VmKey) {
        let policy = self.vm(key).map(|vm| policy_of(&vm));
        self.catalog.send_if_modified(|current| match policy {
            Some(policy) if current.get(key).is_some_and(|p| **p == policy) => false,
            Some(policy) => {
                log_warnings(key, &policy);
                Arc::make_mut(current).insert(key.clone(), Arc::new(policy));
                true
            }
            None => current.contains_key(key) && Arc::make_mut(current).remove(key).is_some(),
        });
    }

    /// One VM's status as the stores show it now.
    fn current_status(&self, key: &VmKey) -> BackendStatus {
        let vm = self.vm(key);
        let vmi = self.vmis.get(&ObjectRef::new(&key.name).within(&key.namespace));
        let port = vm.as_ref().map(|vm| policy_of(vm).port).unwrap_or(8080);
        derive_status(vm.as_deref(), vmi.as_deref(), port)
    }

    /// Recomputes one VM's status from the stores; publishes it if it changed. Only VMs
    /// someone asked about (`Backend::status`) have a channel: thousands of idle VMs
    /// cost nothing here.
    fn refresh_status(&self, key: &VmKey) {
        if !self.statuses.lock().expect("statuses lock").contains_key(key) {
            return;
        }
        let status = self.current_status(key);
        let mut statuses = self.statuses.lock().expect("statuses lock");
        let Some(sender) = statuses.get_mut(key) else {
            return;
        };
        sender.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            tracing::debug!(vm = %key, phase = ?status.phase, endpoint = ?status.endpoint, "VM status");
            *current = status;
            true
        });
    }

    fn refresh_all(&self) {
        self.refresh_catalog();
        let keys: Vec<VmKey> = self.statuses.lock().expect("statuses lock").keys().cloned().collect();
        for key in keys {
            self.refresh_status(&key);
        }
    }

    async fn patch_run_strategy(&self, key: &VmKey, strategy: &str, op: &'static str) -> Result<(), BackendError> {
        let vm = self.vm(key).ok_or_else(|| BackendError::NotFound(key.clone()))?;
        let mut spec = json!({ "runStrategy": strategy });
        if vm.spec.running.is_some() {
            // `running` and `runStrategy` are mutually exclusive: drop the deprecated one.
            spec["running"] = serde_json::Value::Null;
        }
        let patch = json!({ "spec": spec });
        self.vm_api(key)
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| api_error(key, op, e))
    }

    async fn subresource(&self, key: &VmKey, action: &'static str) -> Result<(), BackendError> {
        if !self.config.pause {
            return Err(BackendError::Unsupported(action));
        }
        let url = format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachineinstances/{}/{action}",
            key.namespace, key.name
        );
        let request = http::Request::put(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(b"{}".to_vec())
            .map_err(|e| BackendError::Failed {
                op: action,
                message: e.to_string(),
            })?;
        self.client
            .request_text(request)
            .await
            .map(|_| ())
            .map_err(|e| api_error(key, action, e))
    }

    async fn wait_for(&self, key: &VmKey, op: &'static str, phase: BackendPhase) -> Result<(), BackendError> {
        let mut status = self.status(key).ok_or_else(|| BackendError::NotFound(key.clone()))?;
        let reached = tokio::time::timeout(STOP_TIMEOUT, async {
            status.wait_for(|s| s.phase == phase).await.is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err(BackendError::NotFound(key.clone())),
            Err(_) => Err(BackendError::Failed {
                op,
                message: format!("the VM did not reach {phase:?} within {STOP_TIMEOUT:?}"),
            }),
        }
    }
}

/// JSON pointer to the activity annotation (`/` in the key escaped as `~1`).
const LAST_ACTIVITY_POINTER: &str = "/metadata/annotations/vm-activator.io~1last-activity";

/// The recorded activity: the annotation's exact text (for a JSON patch `test`) and time.
fn recorded_activity(vm: &VirtualMachine) -> Option<(String, SystemTime)> {
    let text = vm.annotations().get(LAST_ACTIVITY_ANNOTATION)?;
    let at = humantime::parse_rfc3339_weak(text).ok()?;
    Some((text.clone(), at))
}

fn api_error(key: &VmKey, op: &'static str, e: kube::Error) -> BackendError {
    match e {
        kube::Error::Api(status) if status.code == 404 => BackendError::NotFound(key.clone()),
        kube::Error::Api(status) => BackendError::Failed {
            op,
            message: format!("{} ({})", status.message, status.code),
        },
        other => BackendError::Unavailable(format!("{op} {key}: {other}")),
    }
}

/// What the backend reports for one VM, from its VM and VMI objects.
fn derive_status(vm: Option<&VirtualMachine>, vmi: Option<&VirtualMachineInstance>, port: u16) -> BackendStatus {
    let status = |phase, endpoint, message: Option<String>| BackendStatus {
        phase,
        endpoint,
        message,
    };
    if let Some(vmi) = vmi {
        if vmi.meta().deletion_timestamp.is_some() {
            return status(BackendPhase::Stopping, None, None);
        }
        let s = vmi.status.clone().unwrap_or_default();
        let paused = s.conditions.iter().any(|c| c.type_ == "Paused" && c.status == "True");
        let endpoint = s
            .interfaces
            .first()
            .and_then(|i| i.ip_address.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, port));
        return match s.phase.as_deref() {
            Some("Running") if paused => status(BackendPhase::Paused, endpoint, None),
            Some("Running") if endpoint.is_some() => status(BackendPhase::Running, endpoint, None),
            Some("Succeeded") | Some("Failed") => status(
                BackendPhase::Stopped,
                None,
                Some(format!(
                    "VirtualMachineInstance {}",
                    s.phase.as_deref().unwrap_or_default()
                )),
            ),
            _ => status(BackendPhase::Starting, None, None),
        };
    }
    let Some(vm) = vm else {
        return status(BackendPhase::Stopped, None, Some("the VirtualMachine is gone".into()));
    };
    let wants_running = match vm.spec.run_strategy.as_deref() {
        Some("Always") | Some("RerunOnFailure") | Some("Once") => true,
        Some(_) => false,
        None => vm.spec.running == Some(true),
    };
    if wants_running {
        status(BackendPhase::Starting, None, None)
    } else {
        status(BackendPhase::Stopped, None, None)
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Vm,
    Vmi,
}

type WatchStream<K> = futures_util::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// Keeps one store in step with the API server until the backend is dropped, and
/// reports whether it is synced. After an error (other than 410 Gone, which the watcher
/// handles by re-listing) the watch is started afresh after a backoff, so it re-lists
/// as client-go's reflectors do: a resumed watch with no news would never tell us that
/// the API server is back.
async fn drive<K>(
    backend: std::sync::Weak<KubevirtBackend>,
    mut writer: reflector::store::Writer<K>,
    kind: Kind,
    watch: impl Fn(&KubevirtBackend) -> WatchStream<K>,
) where
    K: Resource<DynamicType = ()> + ResourceExt + Clone + 'static,
{
    let mut backoff = ReconnectBackoff::default();
    loop {
        let Some(mut stream) = backend.upgrade().map(|b| watch(&b)) else {
            return;
        };
        while let Some(item) = stream.next().await {
            let Some(backend) = backend.upgrade() else {
                return;
            };
            let synced = match kind {
                Kind::Vm => &backend.health.vms_synced,
                Kind::Vmi => &backend.health.vmis_synced,
            };
            match item {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    match event {
                        watcher::Event::InitDone => {
                            backoff = ReconnectBackoff::default();
                            if !synced.swap(true, Ordering::SeqCst) {
                                tracing::info!(kind = kind_name(kind), "watch synced");
                            }
                            backend.refresh_all();
                        }
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        watcher::Event::Apply(obj) | watcher::Event::Delete(obj) => {
                            let key = VmKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
                            if matches!(kind, Kind::Vm) {
                                backend.refresh_catalog_entry(&key);
                            }
                            backend.refresh_status(&key);
                        }
                    }
                }
                // 410 Gone: the watch fell behind; the watcher re-lists on its own and the
                // store stays consistent meanwhile. Not an outage.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::info!(kind = kind_name(kind), "watch expired (410); re-listing");
                }
                Err(error) => {
                    if synced.swap(false, Ordering::SeqCst) {
                        tracing::warn!(kind = kind_name(kind), %error, "lost the Kubernetes API");
                    } else {
                        tracing::debug!(kind = kind_name(kind), %error, "Kubernetes API still unreachable");
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(BACKOFF_MAX)).await;
    }
}

/// Drops what the stores never read before they keep an object: managedFields (often
/// the largest part), labels (selection is done by the API server), and annotations
/// other than ours (`kubectl.kubernetes.io/last-applied-configuration` alone holds a
/// copy of the object). Memory at thousands of VMs.
fn keep_what_is_read<K: Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.labels_mut().clear();
    object
        .annotations_mut()
        .retain(|key, _| key.starts_with(crate::vm::ANNOTATION_PREFIX));
}

/// A VM's policy from its annotations.
fn policy_of(vm: &VirtualMachine) -> Policy {
    Policy::from_annotations(vm.annotations().iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// Bad annotations are logged once per change of a VM's policy, not on every event.
fn log_warnings(key: &VmKey, policy: &Policy) {
    for warning in &policy.warnings {
        tracing::warn!(vm = %key, %warning, "bad annotation");
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Vm => "VirtualMachine",
        Kind::Vmi => "VirtualMachineInstance",
    }
}

#[async_trait]
impl Backend for KubevirtBackend {
    fn catalog(&self) -> watch::Receiver<Catalog> {
        self.catalog.subscribe()
    }

    fn status(&self, vm: &VmKey) -> Option<watch::Receiver<BackendStatus>> {
        if !self.catalog.borrow().contains_key(vm) {
            return None;
        }
        let current = self.current_status(vm);
        let mut statuses = self.statuses.lock().expect("statuses lock");
        Some(
            statuses
                .entry(vm.clone())
                .or_insert_with(|| watch::channel(current).0)
                .subscribe(),
        )
    }

    async fn start(&self, key: &VmKey) -> Result<(), BackendError> {
        if !self.is_connected() {
            return Err(BackendError::Unavailable("the Kubernetes API is unreachable".into()));
        }
        let vm = self.vm(key).ok_or_else(|| BackendError::NotFound(key.clone()))?;
        // Already asked to run (by us, a peer replica or an operator): nothing to do.
        if vm.spec.run_strategy.as_deref() == Some("Always") {
            return Ok(());
        }
        self.patch_run_strategy(key, "Always", "start").await
    }

    async fn stop(&self, key: &VmKey) -> Result<(), BackendError> {
        self.patch_run_strategy(key, "Halted", "stop").await?;
        self.wait_for(key, "stop", BackendPhase::Stopped).await
    }

    async fn pause(&self, key: &VmKey) -> Result<(), BackendError> {
        self.subresource(key, "pause").await?;
        self.wait_for(key, "pause", BackendPhase::Paused).await
    }

    async fn resume(&self, key: &VmKey) -> Result<(), BackendError> {
        self.subresource(key, "unpause").await
    }

    fn is_connected(&self) -> bool {
        self.health.vms_synced.load(Ordering::SeqCst) && self.health.vmis_synced.load(Ordering::SeqCst)
    }

    async fn record_activity(&self, key: &VmKey, at: SystemTime) -> Result<(), BackendError> {
        let vm = self.vm(key).ok_or_else(|| BackendError::NotFound(key.clone()))?;
        // Any replica's record younger than a tenth of the idle timeout is as good as
        // ours: skip the write, so writes per VM stay bounded however many replicas
        // see traffic. (It also never moves the shared clock backwards.)
        let every = self
            .catalog
            .borrow()
            .get(key)
            .map(|policy| policy.idle_timeout / 10)
            .unwrap_or_default();
        if recorded_activity(&vm).is_some_and(|(_, recorded)| recorded + every >= at) {
            return Ok(());
        }
        let value = humantime::format_rfc3339_millis(at).to_string();
        let patch = json!({ "metadata": { "annotations": { LAST_ACTIVITY_ANNOTATION: value } } });
        self.vm_api(key)
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| api_error(key, "record activity", e))
    }

    fn shared_activity(&self, key: &VmKey) -> Option<SystemTime> {
        self.vm(key).and_then(|vm| recorded_activity(&vm)).map(|(_, at)| at)
    }

    async fn stop_if_idle(&self, key: &VmKey, local_activity: SystemTime) -> Result<StopOutcome, BackendError> {
        let vm = self.vm(key).ok_or_else(|| BackendError::NotFound(key.clone()))?;
        if vm.spec.run_strategy.as_deref() == Some("Halted") {
            // A peer's stop won: just wait for it.
            self.wait_for(key, "stop", BackendPhase::Stopped).await?;
            return Ok(StopOutcome::Stopped);
        }
        let Some((recorded, _)) = recorded_activity(&vm) else {
            // Nothing to compare against yet: record ours; the next idle check compares.
            self.record_activity(key, local_activity).await?;
            return Ok(StopOutcome::PeerActive);
        };
        // One atomic patch: fails (422) if any replica recorded activity, or anyone
        // changed the run strategy, since this replica read the VM.
        let mut ops = vec![json!({ "op": "test", "path": LAST_ACTIVITY_POINTER, "value": recorded })];
        match (&vm.spec.run_strategy, vm.spec.running) {
            (Some(strategy), _) => ops.extend([
                json!({ "op": "test", "path": "/spec/runStrategy", "value": strategy }),
                json!({ "op": "replace", "path": "/spec/runStrategy", "value": "Halted" }),
            ]),
            (None, Some(running)) => ops.extend([
                json!({ "op": "test", "path": "/spec/running", "value": running }),
                json!({ "op": "remove", "path": "/spec/running" }),
                json!({ "op": "add", "path": "/spec/runStrategy", "value": "Halted" }),
            ]),
            (None, None) => ops.push(json!({ "op": "add", "path": "/spec/runStrategy", "value": "Halted" })),
        }
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::Value::Array(ops)).map_err(|e| BackendError::Failed {
                op: "stop",
                message: e.to_string(),
            })?;
        match self
            .vm_api(key)
            .patch(&key.name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => {
                self.wait_for(key, "stop", BackendPhase::Stopped).await?;
                Ok(StopOutcome::Stopped)
            }
            Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => {
                tracing::info!(vm = %key, "a peer saw activity (compare-and-stop failed); keeping the VM");
                Ok(StopOutcome::PeerActive)
            }
            Err(e) => Err(api_error(key, "stop", e)),
        }
    }

    async fn shutdown(&self) {
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(run_strategy: Option<&str>, running: Option<bool>) -> VirtualMachine {
        VirtualMachine::new(
            "demo",
            VirtualMachineSpec {
                run_strategy: run_strategy.map(str::to_string),
                running,
            },
        )
    }

    fn vmi(phase: &str, ip: Option<&str>, paused: bool) -> VirtualMachineInstance {
        let mut vmi = VirtualMachineInstance::new("demo", VmiSpec {});
        vmi.status = Some(VmiStatus {
            phase: Some(phase.into()),
            interfaces: ip
                .map(|ip| VmiInterface {
                    ip_address: Some(ip.into()),
                })
                .into_iter()
                .collect(),
            conditions: paused
                .then(|| VmiCondition {
                    type_: "Paused".into(),
                    status: "True".into(),
                })
                .into_iter()
                .collect(),
        });
        vmi
    }

    #[test]
    fn status_table() {
        let halted = vm(Some("Halted"), None);
        let always = vm(Some("Always"), None);
        let legacy = vm(None, Some(true));
        let cases = [
            ("halted, no VMI", Some(&halted), None, BackendPhase::Stopped),
            ("always, no VMI yet", Some(&always), None, BackendPhase::Starting),
            ("deprecated running: true", Some(&legacy), None, BackendPhase::Starting),
            (
                "pending",
                Some(&always),
                Some(vmi("Pending", None, false)),
                BackendPhase::Starting,
            ),
            (
                "scheduled",
                Some(&always),
                Some(vmi("Scheduled", None, false)),
                BackendPhase::Starting,
            ),
            (
                "running without IP",
                Some(&always),
                Some(vmi("Running", None, false)),
                BackendPhase::Starting,
            ),
            (
                "running with IP",
                Some(&always),
                Some(vmi("Running", Some("10.0.0.7"), false)),
                BackendPhase::Running,
            ),
            (
                "paused",
                Some(&always),
                Some(vmi("Running", Some("10.0.0.7"), true)),
                BackendPhase::Paused,
            ),
            (
                "failed",
                Some(&always),
                Some(vmi("Failed", None, false)),
                BackendPhase::Stopped,
            ),
            ("VM deleted", None, None, BackendPhase::Stopped),
        ];
        for (name, vm, vmi, phase) in cases {
            let status = derive_status(vm, vmi.as_ref(), 9000);
            assert_eq!(status.phase, phase, "{name}");
            if phase == BackendPhase::Running {
                assert_eq!(status.endpoint, Some("10.0.0.7:9000".parse().unwrap()));
            }
        }
    }
}
