//! The KubeVirt backend: VirtualMachines carrying the opt-in label
//! `vm-activator.io/enabled=true` and their VirtualMachineInstances, kept in
//! watch-driven reflector stores — readiness is event-driven, never polled. Starts and
//! stops by JSON merge patch of `spec.runStrategy` (`Always` / `Halted`; a VM still on
//! the deprecated `spec.running` gets `running: null` in the same patch — CRDs do not
//! accept strategic-merge patches). Pause/unpause through `subresources.kubevirt.io`
//! when enabled. Endpoint = VMI `status.interfaces[0].ipAddress` + the VM's port.
//!
//! This file has the backend and its trait methods; `resources.rs` the KubeVirt types
//! and the RBAC the backend needs, `watches.rs` the watches and what they feed (catalog,
//! per-VM status), `status.rs` how a VM's phase is read from its VM and VMI,
//! `writes.rs` every write (run strategy, pause, the activity record, compare-and-stop).
//!
//! Owns: everything Kubernetes. The only module that imports kube.
//! Must not import `activator`, `lifecycle`, `ingress`, `server`.

mod resources;
mod status;
mod watches;
mod writes;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use resources::{
    VirtualMachine, VirtualMachineInstance, VirtualMachineSpec, VmiCondition, VmiInterface, VmiSpec, VmiStatus,
    API_ACCESS, PAUSE_API_ACCESS,
};

use super::{Backend, BackendError, BackendPhase, BackendStatus, Catalog, StopOutcome};
use crate::config::KubevirtConfig;
use crate::vm::{VmKey, OPT_IN_LABEL};
use watches::{drive, Kind};
use writes::recorded_activity;

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
                message: format!("the VM did not reach {phase:?} within {STOP_TIMEOUT:?}"),
            }),
        }
    }
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
        self.write_activity(key, at).await
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
        let outcome = self.compare_and_stop(key, &vm, &recorded).await?;
        if outcome == StopOutcome::Stopped {
            self.wait_for(key, "stop", BackendPhase::Stopped).await?;
        }
        Ok(outcome)
    }

    async fn shutdown(&self) {
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
    }
}
