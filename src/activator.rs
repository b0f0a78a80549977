//! The activator: the registry `VmKey → VmHandle`, kept in step with the backend's
//! catalog, and the process-wide drain. Each VM's life is its owner's business
//! (`lifecycle`); the registry only adds VMs, tells owners of changed policies, removes
//! VMs that left, and asks every owner to answer its held requests at the drain deadline.
//!
//! Owns: the registry, catalog sync, draining.
//! Must not import HTTP frameworks (axum, hyper), `ingress`, `server`, or any backend
//! implementation (only the `backend` trait).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use foldhash::fast::RandomState;
use tokio::time::Instant;

use crate::backend::{Backend, Catalog};
use crate::lifecycle::{AdmitError, Context, IdleRules, VmHandle};
use crate::metrics::Metrics;
use crate::readiness::GuestProbe;

/// VMs by namespace, then name: looked up with two `&str` (no key allocated per request),
/// hashed with foldhash (randomly seeded per process; SipHash was a tenth of the
/// lookup's cost, and the keys are inserted from the catalog, not by senders).
type Registry = HashMap<String, HashMap<String, VmHandle, RandomState>, RandomState>;

/// The activator. Shared as `Arc<Activator>`.
pub struct Activator {
    vms: RwLock<Registry>,
    context: Arc<Context>,
    metrics: Metrics,
}

impl Activator {
    /// An activator over `backend`, with the VMs of the backend's current catalog, idle
    /// VMs scaled down by `idle`.
    pub fn new(
        backend: Arc<dyn Backend>,
        probe: Arc<dyn GuestProbe>,
        metrics: Metrics,
        idle: IdleRules,
    ) -> Arc<Activator> {
        let activator = Arc::new(Activator {
            vms: RwLock::new(HashMap::default()),
            context: Context::new(backend, probe, idle),
            metrics,
        });
        let weak = Arc::downgrade(&activator);
        activator.metrics.set_phase_source(Box::new(move || {
            weak.upgrade()
                .map(|a| {
                    a.vms()
                        .iter()
                        .map(|vm| {
                            let state = vm.gate().state();
                            (vm.key().clone(), state.phase, state.policy.kind.clone())
                        })
                        .collect()
                })
                .unwrap_or_default()
        }));
        let catalog = activator.backend().catalog().borrow().clone();
        activator.sync_catalog(&catalog);
        activator
    }

    /// The backend the VMs run on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        self.context.backend()
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Keeps the registry in step with the backend's catalog until the backend goes away.
    pub async fn run_catalog_sync(self: Arc<Self>) {
        let mut catalog = self.backend().catalog();
        loop {
            // Sync what is current *after* subscribing: a change published between
            // `new` and this subscription would otherwise count as seen and be lost.
            let current = catalog.borrow_and_update().clone();
            self.sync_catalog(&current);
            if catalog.changed().await.is_err() {
                return;
            }
        }
    }

    /// Adds VMs that are new, tells the owners of VMs whose policy changed (it takes
    /// effect when the VM is next stopped), and removes VMs that left the catalog.
    pub fn sync_catalog(&self, catalog: &Catalog) {
        let mut removed = Vec::new();
        // Told once the registry's lock is released: an owner at rest takes its first
        // steps on this thread (`VmHandle::send`), and they must not run under the lock.
        let mut changed = Vec::new();
        {
            let mut vms = self.vms.write().unwrap_or_else(|e| e.into_inner());
            for (key, policy) in catalog.iter() {
                let namespace = vms.entry(key.namespace.clone()).or_default();
                match namespace.get(&key.name) {
                    None => {
                        let vm = VmHandle::new(key.clone(), policy.clone(), self.metrics.vm(key), self.context.clone());
                        if vm.needs_owner(policy) {
                            // Its owner runs from now on, to start it ahead of each keep-warm
                            // window, or of the event its stored idle history predicts.
                            changed.push((vm.clone(), policy.clone()));
                        }
                        namespace.insert(key.name.clone(), vm);
                    }
                    Some(vm) if vm.gate().policy() != *policy => changed.push((vm.clone(), policy.clone())),
                    Some(_) => {}
                }
            }
            for namespace in vms.values_mut() {
                namespace.retain(|_, vm| {
                    let keep = catalog.contains_key(vm.key());
                    if !keep {
                        removed.push(vm.clone());
                    }
                    keep
                });
            }
            vms.retain(|_, namespace| !namespace.is_empty());
        }
        for (vm, policy) in changed {
            vm.set_policy(policy);
        }
        for vm in removed {
            vm.remove();
            self.metrics.remove_vm(vm.key());
        }
    }

    /// The VM `{namespace}/{name}`, if known. Allocation-free.
    pub fn vm(&self, namespace: &str, name: &str) -> Option<VmHandle> {
        let vms = self.vms.read().unwrap_or_else(|e| e.into_inner());
        vms.get(namespace)?.get(name).cloned()
    }

    /// The VM's handle, as [`Activator::vm`] — and a VM the backend lists but the
    /// catalog sync (its own task, a step behind the backend) has not registered yet is
    /// registered now: a replica whose `/readyz` says the backend is synced never refuses
    /// an event for a VM the backend knows. (A soak run caught that window: a Deployment
    /// created just before the activator started, `/readyz` 200, the first event 503.)
    pub fn vm_or_sync(&self, namespace: &str, name: &str) -> Option<VmHandle> {
        if let Some(vm) = self.vm(namespace, name) {
            return Some(vm);
        }
        let catalog = self.backend().catalog().borrow().clone();
        if !catalog.contains_key(&crate::vm::VmKey::new(namespace, name)) {
            return None;
        }
        self.sync_catalog(&catalog);
        self.vm(namespace, name)
    }

    /// Every VM, sorted by key.
    pub fn vms(&self) -> Vec<VmHandle> {
        let vms = self.vms.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = vms.values().flat_map(|ns| ns.values().cloned()).collect();
        all.sort_by(|a, b| a.key().cmp(b.key()));
        all
    }

    /// New requests get 503 (`draining`) from now on; held and in-flight ones continue.
    pub fn start_draining(&self) {
        self.context.start_draining();
    }

    /// Whether `start_draining` was called.
    pub fn is_draining(&self) -> bool {
        self.context.is_draining()
    }

    /// Returns once no request is held or in flight anywhere, or at `deadline`.
    /// Returns whether everything finished.
    pub async fn wait_drained(&self, deadline: Instant) -> bool {
        loop {
            let busy = self
                .vms()
                .iter()
                .any(|vm| vm.gate().in_flight() > 0 || vm.gate().has_held());
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The drain deadline passed: every request still held is answered with 503.
    pub fn reject_held(&self) {
        for vm in self.vms() {
            vm.reject_held(AdmitError::Draining);
        }
    }

    /// Ends every VM's owner task (the process is about to exit).
    pub fn shutdown(&self) {
        for vm in self.vms() {
            vm.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{FakeBackend, FakeOptions};
    use crate::config::ReadinessConfig;
    use crate::readiness::Prober;
    use crate::vm::{Policy, VmKey};

    fn activator(backend: Arc<FakeBackend>) -> Arc<Activator> {
        Activator::new(
            backend,
            Arc::new(Prober::new(ReadinessConfig::default())),
            Metrics::new(),
            IdleRules::fixed(Duration::from_millis(50)),
        )
    }

    #[tokio::test]
    async fn a_vm_the_backend_lists_is_found_before_the_sync_task_registers_it() {
        let backend = FakeBackend::new([], FakeOptions::default());
        let activator = activator(backend.clone());
        // No sync task runs: the registry is behind the catalog.
        backend.add_vm(VmKey::new("ns", "new"), Policy::default());
        assert!(activator.vm("ns", "new").is_none());
        assert!(activator.vm_or_sync("ns", "new").is_some());
        assert!(activator.vm("ns", "new").is_some(), "registered for good");
        assert!(activator.vm_or_sync("ns", "unknown").is_none());
    }

    #[tokio::test]
    async fn a_catalog_change_before_the_sync_task_subscribes_is_not_lost() {
        let backend = FakeBackend::new([], FakeOptions::default());
        let activator = activator(backend.clone());
        // Published after `new` read the catalog, before the sync task subscribes.
        backend.add_vm(VmKey::new("ns", "late"), Policy::default());
        let sync = tokio::spawn(activator.clone().run_catalog_sync());
        let deadline = Instant::now() + Duration::from_secs(2);
        while activator.vm("ns", "late").is_none() {
            assert!(Instant::now() < deadline, "the VM never got registered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sync.abort();
    }

    #[tokio::test]
    async fn a_vm_leaving_the_catalog_answers_its_held_requests() {
        let key = VmKey::new("ns", "gone");
        let policy = Policy {
            start_timeout: Duration::from_secs(30),
            ..Policy::default()
        };
        let backend = FakeBackend::new(
            [(key.clone(), policy)],
            FakeOptions {
                boot_delay: Duration::from_secs(30),
                ..FakeOptions::default()
            },
        );
        let activator = activator(backend.clone());
        let vm = activator.vm("ns", "gone").unwrap();
        let held = tokio::spawn({
            let vm = vm.clone();
            async move { vm.admit(0).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        activator.sync_catalog(&Arc::new(Default::default()));
        let result = tokio::time::timeout(Duration::from_secs(2), held)
            .await
            .expect("no hang")
            .unwrap();
        assert!(matches!(result, Err(AdmitError::Stopped(_))), "{result:?}");
        assert!(activator.vm("ns", "gone").is_none());
        assert!(
            matches!(vm.admit(0).await, Err(AdmitError::Stopped(_))),
            "a removed VM admits nothing"
        );
    }

    #[tokio::test]
    async fn a_changed_policy_takes_effect_once_the_vm_is_stopped() {
        let key = VmKey::new("ns", "vm");
        let backend = FakeBackend::new([(key.clone(), Policy::default())], FakeOptions::default());
        let activator = activator(backend.clone());
        let changed = Policy {
            port: 9000,
            ..Policy::default()
        };
        backend.add_vm(key.clone(), changed.clone());
        activator.sync_catalog(&backend.catalog().borrow().clone());
        let vm = activator.vm("ns", "vm").unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while vm.gate().policy().port != 9000 {
            assert!(Instant::now() < deadline, "the new policy never took effect");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The owner spawned to apply it has nothing more to do.
        while vm.owner_running() {
            assert!(Instant::now() < deadline, "the owner of a stopped VM keeps running");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
