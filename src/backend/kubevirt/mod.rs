//! The Kubernetes backend: KubeVirt VirtualMachines and workloads with a `/scale`
//! subresource (Deployments, StatefulSets, configured kinds), each carrying the opt-in
//! label `vm-activator.io/enabled=true`, kept in watch-driven reflector stores with
//! their VirtualMachineInstances and pods — readiness is event-driven, never polled.
//!
//! Long because: the backend's struct, its construction and the `Backend` trait impl
//! (each method a few lines handing over to `watches.rs`, `writes.rs`, `scale.rs`,
//! `status.rs`) are one piece; the concerns themselves live in those files.
//!
//! VMs start and stop by JSON merge patch of `spec.runStrategy` (`Always` / `Halted`; a
//! VM still on the deprecated `spec.running` gets `running: null` in the same patch —
//! CRDs do not accept strategic-merge patches); pause/unpause through
//! `subresources.kubevirt.io` when enabled; endpoint = the VMI's first interface (or
//! its interface on the policy's Multus network) + the port. Workloads scale through
//! `/scale`; their endpoints are their ready pods' addresses.
//!
//! This file has the backend and its trait methods; `resources.rs` the KubeVirt types
//! and the RBAC the backend needs, `watches.rs` the watches and what they feed (catalog,
//! per-name status), `targets.rs` what a name stands for (and conflicts), `status.rs` a
//! VM's phase from its VM and VMI, `workloads.rs` a workload's from it and its pods,
//! `writes.rs` the VM writes and the activity record, `scale.rs` the workload writes.
//!
//! Owns: everything Kubernetes. The only module that imports kube.
//! Must not import `activator`, `lifecycle`, `ingress`, `server`.

mod access;
mod events;
mod health;
mod resources;
mod scale;
mod selector;
mod status;
mod targets;
mod watches;
mod workloads;
mod writes;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use resources::{
    scale_kind_access, MultusNetwork, VirtualMachine, VirtualMachineInstance, VirtualMachineSpec, VmNetwork,
    VmTemplate, VmTemplateSpec, VmiCondition, VmiInterface, VmiSpec, VmiStatus, API_ACCESS, PAUSE_API_ACCESS,
};

use super::{Access, AdminVerb, Backend, BackendError, BackendPhase, BackendStatus, Catalog, StopOutcome, VmEvent};
use crate::config::KubevirtConfig;
use crate::vm::{VmKey, OPT_IN_LABEL};
use targets::Target;
use watches::{drive, keep_what_is_read, keep_workload, key_of, WatchHealth};
use workloads::{api_resource, keep_pod_fields, WorkloadKind};
use writes::recorded_activity;

/// How long a stop may take before it is reported as failed.
const STOP_TIMEOUT: Duration = Duration::from_secs(300);

/// The Kubernetes backend (KubeVirt VMs and scalable workloads).
pub struct KubevirtBackend {
    client: Client,
    config: KubevirtConfig,
    vms: Store<VirtualMachine>,
    vmis: Store<VirtualMachineInstance>,
    /// One per managed workload kind, in config order.
    workloads: Vec<WorkloadKind>,
    /// Pods (when any workload kind is managed), slimmed.
    pods: Store<Pod>,
    catalog: watch::Sender<Catalog>,
    /// Held while a catalog change is computed from the stores and published. Each watch
    /// refreshes from its own task: without it, a catalog computed before another watch's
    /// store changed could be published after the one computed from that change, and the
    /// newer objects would be missing until they changed again (seen in CI: a Deployment
    /// never listed after its watch synced while the VM watch's sync rebuilt the catalog).
    catalog_writes: Mutex<()>,
    statuses: Mutex<HashMap<VmKey, watch::Sender<BackendStatus>>>,
    /// Every watch and whether it is synced: `/readyz` needs them all.
    health: Vec<WatchHealth>,
    /// Whether writes reach the API server: `/readyz` needs that too.
    write_health: health::WriteHealth,
    /// Kubernetes Events on the targets.
    events: events::EventSink,
    /// Idle histories handed over and not written yet: each rides on the target's next
    /// idle scale-down (bounded: one per target).
    idle_histories: Mutex<HashMap<VmKey, String>>,
    /// The activity record this replica last wrote per target (text and time): what the
    /// server held then, even while the watch has not brought it to the store yet.
    /// Bounded: one per target; forgotten when a compare-and-stop fails.
    own_activity: Mutex<HashMap<VmKey, (String, SystemTime)>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// How long a connection to the API server may stay silent before it is given up:
/// `watch_timeout` + 4 s — past the server's own end of every watch, and before
/// kube-runtime's watcher (which waits `watch_timeout` + 5 s) would quietly open another.
/// The bound on noticing a half-open path to the API server (59 s by default).
pub fn api_read_timeout(watch_timeout: Duration) -> Duration {
    watch_timeout + Duration::from_secs(4)
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
        let mut kube_config = kube_config;
        // A path to the API server that stops moving bytes without closing (a load
        // balancer or conntrack entry that forgot the flow) gives no error: a silent watch
        // would be quietly replaced by kube-runtime's watcher after `watch_timeout` + 5 s,
        // over the same dead path, for ever. Every connection silent for longer than a
        // watch can be (the server ends each after `watch_timeout`) fails instead — the
        // watch with it, so `/readyz` fails and a re-list is tried — and every list,
        // write and review on a dead path ends as late.
        kube_config.read_timeout = Some(api_read_timeout(config.watch_timeout));
        kube_config.reset_reader_on_write = true;
        let client = Client::try_from(kube_config).map_err(|e| BackendError::Unavailable(e.to_string()))?;
        Ok(Self::start(client, config))
    }

    /// Starts the watches with an existing client.
    pub fn start(client: Client, config: KubevirtConfig) -> Arc<KubevirtBackend> {
        let (vms, vm_writer) = reflector::store();
        let (vmis, vmi_writer) = reflector::store();
        let (pods, pod_writer) = reflector::store();
        let kinds = config.workload_kinds();
        let mut workload_writers = Vec::new();
        let mut workloads = Vec::new();
        for kind in &kinds {
            let resource = api_resource(kind);
            let writer = reflector::store::Writer::new(resource.clone());
            workloads.push(WorkloadKind {
                resource,
                store: writer.as_reader(),
            });
            workload_writers.push(writer);
        }
        let mut health = vec![
            WatchHealth::new("VirtualMachine"),
            WatchHealth::new("VirtualMachineInstance"),
        ];
        health.extend(kinds.iter().map(|k| WatchHealth::new(k.kind.clone())));
        if !kinds.is_empty() {
            health.push(WatchHealth::new("Pod"));
        }
        let (events, events_task) = events::EventSink::start(client.clone());
        let backend = Arc::new(KubevirtBackend {
            client: client.clone(),
            config,
            vms,
            vmis,
            workloads,
            pods,
            catalog: watch::channel(Arc::new(BTreeMap::new())).0,
            catalog_writes: Mutex::new(()),
            statuses: Mutex::new(HashMap::new()),
            health,
            write_health: health::WriteHealth::default(),
            events,
            idle_histories: Mutex::new(HashMap::new()),
            own_activity: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let opted_in = Some(format!("{OPT_IN_LABEL}=true"));
        let weak = Arc::downgrade(&backend);
        let mut tasks = vec![tokio::spawn(health::recheck(weak.clone())), events_task];
        let labels = opted_in.clone();
        tasks.push(tokio::spawn(drive(
            weak.clone(),
            vm_writer,
            0,
            move |b: &Self| {
                let apis = b.apis(|ns| b.typed_api::<VirtualMachine>(ns));
                b.watch_all(apis, labels.clone(), keep_what_is_read)
            },
            |b, vm| {
                let key = key_of(vm);
                b.refresh_catalog_entry(&key);
                b.refresh_status(&key);
            },
        )));
        tasks.push(tokio::spawn(drive(
            weak.clone(),
            vmi_writer,
            1,
            |b: &Self| {
                let apis = b.apis(|ns| b.typed_api::<VirtualMachineInstance>(ns));
                b.watch_all(apis, None, keep_what_is_read)
            },
            |b, vmi| b.refresh_status(&key_of(vmi)),
        )));
        for (index, writer) in workload_writers.into_iter().enumerate() {
            let labels = opted_in.clone();
            tasks.push(tokio::spawn(drive(
                weak.clone(),
                writer,
                2 + index,
                move |b: &Self| {
                    let resource = &b.workloads[index].resource;
                    let apis = b.apis(|ns| match ns {
                        Some(ns) => Api::namespaced_with(b.client.clone(), ns, resource),
                        None => Api::all_with(b.client.clone(), resource),
                    });
                    b.watch_all::<DynamicObject>(apis, labels.clone(), keep_workload)
                },
                |b, workload| {
                    let key = key_of(workload);
                    b.refresh_catalog_entry(&key);
                    b.refresh_status(&key);
                },
            )));
        }
        if !kinds.is_empty() {
            tasks.push(tokio::spawn(drive(
                weak,
                pod_writer,
                2 + kinds.len(),
                |b: &Self| {
                    let apis = b.apis(|ns| b.typed_api::<Pod>(ns));
                    b.watch_all(apis, None, keep_pod_fields)
                },
                |b, pod| b.refresh_namespace(pod.metadata.namespace.as_deref().unwrap_or_default()),
            )));
        }
        backend.tasks.lock().expect("tasks lock").extend(tasks);
        backend
    }

    fn typed_api<K>(&self, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    {
        match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    fn vm(&self, key: &VmKey) -> Option<Arc<VirtualMachine>> {
        self.vms.get(&ObjectRef::new(&key.name).within(&key.namespace))
    }

    fn vm_api(&self, key: &VmKey) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), &key.namespace)
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
                message: format!("{key} did not reach {phase:?} within {STOP_TIMEOUT:?}"),
            }),
        }
    }
}

impl KubevirtBackend {
    /// The backend's error for a failed API call; a failure at the connection level
    /// marks the write path degraded.
    fn api_error(&self, key: &VmKey, op: &'static str, e: kube::Error) -> BackendError {
        match e {
            kube::Error::Api(status) if status.code == 404 => BackendError::NotFound(key.clone()),
            kube::Error::Api(status) => BackendError::Failed {
                op,
                message: format!("{} ({})", status.message, status.code),
            },
            other => {
                if health::is_connection_level(&other) {
                    self.write_health.failed(&other);
                }
                BackendError::Unavailable(format!("{op} {key}: {other}"))
            }
        }
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
        // Computed under the lock that refreshes take, so a change landing meanwhile is
        // either in this status or refreshes the channel after it.
        let mut statuses = self.statuses.lock().expect("statuses lock");
        Some(
            statuses
                .entry(vm.clone())
                .or_insert_with(|| watch::channel(self.current_status(vm)).0)
                .subscribe(),
        )
    }

    fn status_message(&self, key: &VmKey) -> Option<String> {
        // Computed, not subscribed: listing thousands of VMs must not leave a status
        // channel behind for each.
        self.catalog
            .borrow()
            .contains_key(key)
            .then(|| self.current_status(key).message)
            .flatten()
    }

    async fn start(&self, key: &VmKey) -> Result<(), BackendError> {
        if !self.is_connected() {
            return Err(BackendError::Unavailable("the Kubernetes API is unreachable".into()));
        }
        match self.target(key)? {
            // Already asked to run (by us, a peer replica or an operator): nothing to do.
            Target::Vm(vm) if vm.spec.run_strategy.as_deref() == Some("Always") => Ok(()),
            Target::Vm(_) => self.patch_run_strategy(key, "Always", "start").await,
            Target::Workload { kind, object } => self.scale_up(key, kind, &object).await,
        }
    }

    async fn stop(&self, key: &VmKey) -> Result<(), BackendError> {
        match self.target(key)? {
            Target::Vm(_) => self.patch_run_strategy(key, "Halted", "stop").await?,
            Target::Workload { kind, object } => {
                if self.scale_down(key, kind, &object, None, None).await? == StopOutcome::PeerActive {
                    return Err(BackendError::Failed {
                        op: "stop",
                        message: "the workload changed meanwhile; it keeps running".into(),
                    });
                }
            }
        }
        self.wait_for(key, "stop", BackendPhase::Stopped).await
    }

    async fn pause(&self, key: &VmKey) -> Result<(), BackendError> {
        if let Target::Workload { .. } = self.target(key)? {
            return Err(BackendError::Unsupported("pause"));
        }
        self.subresource(key, "pause").await?;
        self.wait_for(key, "pause", BackendPhase::Paused).await
    }

    async fn resume(&self, key: &VmKey) -> Result<(), BackendError> {
        if let Target::Workload { .. } = self.target(key)? {
            return Err(BackendError::Unsupported("resume"));
        }
        self.subresource(key, "unpause").await
    }

    fn is_connected(&self) -> bool {
        !self.write_health.is_degraded() && self.health.iter().all(|watch| watch.synced.load(Ordering::SeqCst))
    }

    fn record_event(&self, key: &VmKey, event: VmEvent) {
        self.publish_event(key, &event);
    }

    async fn review_access(&self, token: &str, key: &VmKey, verb: AdminVerb) -> Result<Access, BackendError> {
        self.review(token, key, verb).await
    }

    async fn record_activity(&self, key: &VmKey, at: SystemTime) -> Result<(), BackendError> {
        self.write_activity(key, at).await
    }

    fn record_idle_history(&self, key: &VmKey, history: &str) {
        self.keep_history_for_next_stop(key, history);
    }

    fn shared_activity(&self, key: &VmKey) -> Option<SystemTime> {
        let target = self.target(key).ok()?;
        recorded_activity(target.annotations()).map(|(_, at)| at)
    }

    async fn stop_if_idle(&self, key: &VmKey, local_activity: SystemTime) -> Result<StopOutcome, BackendError> {
        self.idle_stop(key, local_activity).await
    }

    async fn shutdown(&self) {
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
    }
}
