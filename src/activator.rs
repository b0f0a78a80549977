//! The activator: the registry `VmKey → Gate` and the use case
//! `acquire(vm) → InFlightGuard`. It drives exactly one start per cold start (the gate
//! decides who wins), waits for the backend to report the VM running, probes the guest,
//! releases held requests in arrival order (limited by the VM's concurrency), then
//! watches the running VM: if it stops on its own the gate is closed and held requests
//! are answered; if the guest stops answering it is re-probed before taking traffic.
//!
//! Owns: the registry, start/resume orchestration, draining.
//! Must not import: HTTP frameworks (axum, hyper), `ingress`, `server`, `idle`, or any
//! backend implementation (only the `backend` trait).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{Backend, BackendPhase, BackendStatus, Catalog};
use crate::gate::{Gate, GateError, GateState, InFlightGuard, StartKind};
use crate::metrics::{ColdStartPhase, Metrics};
use crate::readiness::Prober;
use crate::vm::{Endpoint, VmPhase};

/// Why a request cannot be admitted.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The activator is draining (SIGTERM): the sender must retry elsewhere.
    #[error("the activator is shutting down")]
    Draining,
    /// The gate refused or gave up on the request.
    #[error(transparent)]
    Gate(#[from] GateError),
}

type Registry = HashMap<String, HashMap<String, Arc<Gate>>>;

/// The activator. Shared as `Arc<Activator>`.
pub struct Activator {
    gates: RwLock<Registry>,
    backend: Arc<dyn Backend>,
    prober: Prober,
    metrics: Metrics,
    draining: AtomicBool,
}

impl Activator {
    /// An activator over `backend`, with gates for the backend's current catalog.
    pub fn new(backend: Arc<dyn Backend>, prober: Prober, metrics: Metrics) -> Arc<Activator> {
        let activator = Arc::new(Activator {
            gates: RwLock::new(HashMap::new()),
            backend,
            prober,
            metrics,
            draining: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&activator);
        activator.metrics.set_phase_source(Box::new(move || {
            weak.upgrade()
                .map(|a| a.gates().iter().map(|g| (g.key().clone(), g.phase())).collect())
                .unwrap_or_default()
        }));
        let catalog = activator.backend.catalog().borrow().clone();
        activator.sync_catalog(&catalog);
        activator
    }

    /// The backend this activator drives.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Keeps the registry in step with the backend's catalog until the backend goes away.
    pub async fn run_catalog_sync(self: Arc<Self>) {
        let mut catalog = self.backend.catalog();
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

    /// Adds gates for new VMs, closes and removes gates of VMs that left, and applies
    /// changed policies to VMs that are stopped (a running VM keeps its policy until it
    /// next stops; the idle scaler re-syncs after every scale-down).
    pub fn sync_catalog(&self, catalog: &Catalog) {
        let mut removed = Vec::new();
        {
            let mut gates = self.gates.write().unwrap_or_else(|e| e.into_inner());
            for (key, policy) in catalog.iter() {
                let namespace = gates.entry(key.namespace.clone()).or_default();
                let replace = match namespace.get(&key.name) {
                    None => true,
                    Some(gate) => {
                        gate.policy() != policy
                            && matches!(gate.phase(), VmPhase::Stopped | VmPhase::Failed)
                            && gate.held() == (0, 0)
                            && gate.in_flight() == 0
                    }
                };
                if replace {
                    let gate = Gate::new(key.clone(), policy.clone(), self.metrics.vm(key));
                    namespace.insert(key.name.clone(), gate);
                }
            }
            for namespace in gates.values_mut() {
                namespace.retain(|_, gate| {
                    let keep = catalog.contains_key(gate.key());
                    if !keep {
                        removed.push(gate.clone());
                    }
                    keep
                });
            }
            gates.retain(|_, namespace| !namespace.is_empty());
        }
        for gate in removed {
            tracing::info!(vm = %gate.key(), "VM left the catalog");
            gate.lost("the VM was removed from the catalog");
            self.metrics.remove_vm(gate.key());
        }
    }

    /// The gate of `{namespace}/{name}`, if that VM is known. Allocation-free.
    pub fn gate(&self, namespace: &str, name: &str) -> Option<Arc<Gate>> {
        let gates = self.gates.read().unwrap_or_else(|e| e.into_inner());
        gates.get(namespace)?.get(name).cloned()
    }

    /// Every gate, sorted by key.
    pub fn gates(&self) -> Vec<Arc<Gate>> {
        let gates = self.gates.read().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = gates.values().flat_map(|ns| ns.values().cloned()).collect();
        all.sort_by(|a, b| a.key().cmp(b.key()));
        all
    }

    /// Admits one request of `body_bytes` to the VM behind `gate`: at once when the VM
    /// is Ready, otherwise held (starting the VM if this is the first request) until it
    /// is Ready, fails, or the request's deadline passes.
    pub async fn acquire(
        self: &Arc<Self>,
        gate: &Arc<Gate>,
        body_bytes: usize,
    ) -> Result<InFlightGuard, ActivateError> {
        if self.is_draining() {
            return Err(ActivateError::Draining);
        }
        if let Some(guard) = gate.try_enter() {
            self.share_activity(gate);
            return Ok(guard);
        }
        let (held, start) = gate.hold(body_bytes)?;
        tracing::debug!(vm = %gate.key(), starts = start.is_some(), "request held");
        if let Some(kind) = start {
            self.spawn_start(gate.clone(), kind);
        }
        let guard = held.admitted().await?;
        self.share_activity(gate);
        Ok(guard)
    }

    /// Hands this replica's activity to the backend so peers see it — at most once per
    /// `idle_timeout / 10` per VM, never once per event (one atomic on the warm path).
    fn share_activity(&self, gate: &Arc<Gate>) {
        if !gate.claim_activity_share(gate.policy().idle_timeout / 10) {
            return;
        }
        let (backend, key) = (self.backend.clone(), gate.key().clone());
        tokio::spawn(async move {
            if let Err(error) = backend.record_activity(&key, std::time::SystemTime::now()).await {
                tracing::debug!(vm = %key, %error, "could not record activity");
            }
        });
    }

    /// The drain deadline passed: answer every request still held with 503.
    pub fn reject_held(&self) {
        for gate in self.gates() {
            gate.reject_held(GateError::ShuttingDown);
        }
    }

    /// Drives a start (or resume) the gate has already recorded as `Starting`.
    pub fn spawn_start(self: &Arc<Self>, gate: Arc<Gate>, kind: StartKind) {
        let this = self.clone();
        tokio::spawn(async move { this.run_vm(gate, kind).await });
    }

    /// The guest behind a Ready gate refused or reset a connection: stop sending it
    /// traffic until a probe passes again.
    pub fn report_unreachable(&self, gate: &Gate, endpoint: Endpoint) {
        if gate.phase() == VmPhase::Ready && gate.set_probing(endpoint) {
            tracing::warn!(vm = %gate.key(), %endpoint, "guest unreachable; re-probing");
        }
    }

    /// New requests get `Draining` from now on; held and in-flight ones continue.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether `start_draining` was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Returns once no request is held or in flight anywhere, or at `deadline`.
    /// Returns whether everything finished.
    pub async fn wait_drained(&self, deadline: Instant) -> bool {
        loop {
            let busy = self.gates().iter().any(|g| g.in_flight() > 0 || g.held().0 > 0);
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One VM's life from a start until it stops: start, boot, probe, release, then
    /// watch it while it runs.
    async fn run_vm(self: Arc<Self>, gate: Arc<Gate>, kind: StartKind) {
        let key = gate.key().clone();
        let Some(mut status) = self.backend.status(&key) else {
            gate.fail(GateError::StartFailed("the backend does not know this VM".into()));
            return;
        };
        let timeout = gate.policy().start_timeout;
        let mut start_called = false;
        let result = tokio::time::timeout(
            timeout,
            self.start_and_probe(&gate, kind, &mut status, &mut start_called),
        )
        .await
        .unwrap_or(Err(GateError::StartTimeout(timeout)));
        match result {
            Ok(endpoint) => {
                if let Some(opened) = gate.open(endpoint) {
                    if let Some(first) = opened.first_held_at {
                        let took = first.elapsed();
                        let seconds = took.as_secs_f64();
                        gate.metrics().series().cold_start.observe(seconds);
                        gate.record_cold_start(took);
                        tracing::info!(vm = %key, %endpoint, held = opened.len(), cold_start_ms = (seconds * 1000.0) as u64, "VM ready");
                    }
                    opened.release(&gate).await;
                    tracing::debug!(vm = %key, "held requests released");
                    self.watch_running(&gate, status).await;
                }
            }
            Err(error) => {
                tracing::warn!(vm = %key, %error, "start failed");
                if start_called {
                    // The VM may be half up: answer the held requests now, then make sure
                    // it does not keep running (and costing) unseen.
                    gate.fail(error);
                    if let Err(e) = self.backend.stop(&key).await {
                        tracing::warn!(vm = %key, error = %e, "stop after failed start failed");
                    }
                } else {
                    gate.fail(error);
                }
            }
        }
    }

    async fn start_and_probe(
        &self,
        gate: &Gate,
        kind: StartKind,
        status: &mut watch::Receiver<BackendStatus>,
        start_called: &mut bool,
    ) -> Result<Endpoint, GateError> {
        let key = gate.key();
        let metrics = gate.metrics();
        let t0 = Instant::now();
        *start_called = true;
        let call = match kind {
            StartKind::Boot => self.backend.start(key).await,
            StartKind::Resume => self.backend.resume(key).await,
        };
        // Only now: the start signal must not wait for series to be created.
        gate.create_metrics();
        metrics.series().scale_ups.inc();
        call.map_err(|e| GateError::StartFailed(e.to_string().into()))?;
        let t1 = Instant::now();
        tracing::debug!(vm = %key, ?kind, "start call returned");
        metrics.cold_start_phase(ColdStartPhase::StartCall, (t1 - t0).as_secs_f64());
        let endpoint = wait_running(status).await?;
        let t2 = Instant::now();
        tracing::debug!(vm = %key, %endpoint, "backend reports running; probing");
        metrics.cold_start_phase(ColdStartPhase::Boot, (t2 - t1).as_secs_f64());
        gate.set_probing(endpoint);
        let policy = gate.policy().clone();
        tokio::select! {
            _ = self.prober.wait_ready(endpoint, &policy.readiness) => {}
            stopped = wait_stopped(status) => return Err(stopped),
        }
        metrics.cold_start_phase(ColdStartPhase::Probe, t2.elapsed().as_secs_f64());
        Ok(endpoint)
    }

    /// While the VM runs: notice it stopping on its own, and re-probe the guest when a
    /// request found it unreachable. Returns when the VM stops or the idle scaler
    /// takes over (the gate leaves Ready/Probing).
    async fn watch_running(&self, gate: &Arc<Gate>, mut status: watch::Receiver<BackendStatus>) {
        let mut gate_state = gate.subscribe();
        loop {
            let current: GateState = gate_state.borrow_and_update().clone();
            match current.phase {
                // Stopping: the idle scaler is deciding; it may call the stop off.
                VmPhase::Ready | VmPhase::Stopping => {}
                VmPhase::Probing => {
                    let endpoint = current.endpoint.expect("Probing always has an endpoint");
                    if let Err(error) = self.reprobe(gate, endpoint, &mut status).await {
                        tracing::warn!(vm = %gate.key(), %error, "guest did not come back");
                        gate.fail(error);
                        let _ = self.backend.stop(gate.key()).await;
                        return;
                    }
                    continue;
                }
                _ => return,
            }
            tokio::select! {
                changed = status.changed() => {
                    let stopped = changed.is_err() || status.borrow().phase == BackendPhase::Stopped;
                    if stopped && gate.phase() == VmPhase::Stopping {
                        // The stop we asked for; `finish_stop` closes the gate.
                        continue;
                    }
                    if stopped && matches!(gate.phase(), VmPhase::Ready | VmPhase::Probing) {
                        let message = status.borrow().message.clone().unwrap_or_else(|| "the VM stopped".into());
                        if self.is_draining() {
                            tracing::info!(vm = %gate.key(), %message, "VM stopped for shutdown");
                        } else {
                            tracing::warn!(vm = %gate.key(), %message, "VM stopped without being asked");
                        }
                        gate.lost(&message);
                        return;
                    }
                }
                changed = gate_state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn reprobe(
        &self,
        gate: &Gate,
        endpoint: Endpoint,
        status: &mut watch::Receiver<BackendStatus>,
    ) -> Result<(), GateError> {
        let timeout = gate.policy().start_timeout;
        let readiness = gate.policy().readiness.clone();
        let probe = async {
            tokio::select! {
                _ = self.prober.wait_ready(endpoint, &readiness) => Ok(()),
                stopped = wait_stopped(status) => Err(stopped),
            }
        };
        tokio::time::timeout(timeout, probe)
            .await
            .unwrap_or(Err(GateError::StartTimeout(timeout)))?;
        if let Some(opened) = gate.open(endpoint) {
            tracing::info!(vm = %gate.key(), "guest answers again");
            opened.release(gate).await;
        }
        Ok(())
    }
}

/// Waits until the backend reports the VM running with an endpoint. A `Stopped` seen
/// after the VM had left `Stopped` means it died while starting.
async fn wait_running(status: &mut watch::Receiver<BackendStatus>) -> Result<Endpoint, GateError> {
    let mut left_stopped = false;
    loop {
        {
            let s = status.borrow_and_update();
            match (s.phase, s.endpoint) {
                (BackendPhase::Running, Some(endpoint)) => return Ok(endpoint),
                (BackendPhase::Stopped, _) if left_stopped => {
                    let message = s
                        .message
                        .clone()
                        .unwrap_or_else(|| "the VM stopped while starting".into());
                    return Err(GateError::Stopped(message.into()));
                }
                (BackendPhase::Stopped, _) => {}
                _ => left_stopped = true,
            }
        }
        if status.changed().await.is_err() {
            return Err(GateError::Stopped("the backend stopped reporting this VM".into()));
        }
    }
}

/// Resolves when the backend reports the VM stopped.
async fn wait_stopped(status: &mut watch::Receiver<BackendStatus>) -> GateError {
    loop {
        if status.changed().await.is_err() {
            return GateError::Stopped("the backend stopped reporting this VM".into());
        }
        let s = status.borrow_and_update();
        if s.phase == BackendPhase::Stopped {
            return GateError::Stopped(s.message.clone().unwrap_or_else(|| "the VM stopped".into()).into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{FakeBackend, FakeOptions};
    use crate::config::ReadinessConfig;
    use crate::vm::{Policy, VmKey};

    #[tokio::test]
    async fn a_catalog_change_before_the_sync_task_subscribes_is_not_lost() {
        let backend = FakeBackend::new([], FakeOptions::default());
        let activator = Activator::new(backend.clone(), Prober::new(ReadinessConfig::default()), Metrics::new());
        // Published after `new` read the catalog, before the sync task subscribes.
        backend.add_vm(VmKey::new("ns", "late"), Policy::default());
        let sync = tokio::spawn(activator.clone().run_catalog_sync());
        let deadline = Instant::now() + Duration::from_secs(2);
        while activator.gate("ns", "late").is_none() {
            assert!(Instant::now() < deadline, "the VM never got a gate");
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
        let activator = Activator::new(backend.clone(), Prober::new(ReadinessConfig::default()), Metrics::new());
        let gate = activator.gate("ns", "gone").unwrap();
        let held = tokio::spawn({
            let activator = activator.clone();
            async move { activator.acquire(&gate, 0).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        activator.sync_catalog(&Arc::new(Default::default()));
        let result = tokio::time::timeout(Duration::from_secs(2), held)
            .await
            .expect("no hang")
            .unwrap();
        assert!(
            matches!(result, Err(ActivateError::Gate(GateError::Stopped(_)))),
            "{result:?}"
        );
        assert!(activator.gate("ns", "gone").is_none());
    }
}
