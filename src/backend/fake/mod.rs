//! An in-process backend for tests and benchmarks. Each "VM" is a loopback HTTP
//! server (the fake guest) that starts listening a configurable boot delay after the
//! start call — as a real guest does after its VM is running — and records every
//! event it accepts so tests can check exactly-once delivery.
//!
//! This file has the backend; `guest.rs` the fake guest (its address, boot wait and
//! HTTP server).
//!
//! Owns: fake VMs and fake guests. Must not import `activator`, `ingress` or `server`.

mod guest;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Backend, BackendError, BackendPhase, BackendStatus, Catalog};
use crate::vm::{Policy, VmKey};
use guest::{reserve_guest_socket, serve_guest, sleep_precisely_until};

/// How fake VMs behave. Changeable at run time through [`FakeBackend::set_options`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Start call → backend reports Running.
    pub running_delay: Duration,
    /// Start call → the guest server starts listening.
    pub boot_delay: Duration,
    /// How long the guest takes to answer each event.
    pub response_delay: Duration,
    /// The status the guest answers events with.
    pub response_status: u16,
    /// Make the start call fail with this message.
    pub start_error: Option<String>,
    /// Start listening at the exact boot instant (a thread's sleep) instead of on the
    /// runtime's 1 ms timer grid — where the activator's own probe timers are, so that
    /// which of the two runs first in a shared tick would decide the measured overhead.
    /// A real guest boots off that grid. For benchmarks; costs a thread per boot.
    pub precise_boot: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            running_delay: Duration::from_millis(5),
            boot_delay: Duration::from_millis(100),
            response_delay: Duration::ZERO,
            response_status: 202,
            start_error: None,
            precise_boot: false,
        }
    }
}

/// What a fake guest has seen; shared with tests.
#[derive(Debug, Default)]
pub struct GuestLog {
    /// `ce-id` of every accepted event (structured mode: the JSON `id`), in arrival order.
    pub event_ids: Vec<String>,
    /// Path of every POST, in arrival order.
    pub paths: Vec<String>,
    /// Headers of the last POST.
    pub last_headers: Vec<(String, String)>,
    /// Body of the last POST.
    pub last_body: Bytes,
    /// When the guest server started listening, per boot.
    pub listening_since: Vec<Instant>,
    /// When the backend's start call was made, per boot.
    pub start_calls: Vec<Instant>,
}

struct FakeVm {
    status: watch::Sender<BackendStatus>,
    log: Arc<Mutex<GuestLog>>,
    /// The VM's task (boot, then the guest server); `Some` while the VM runs.
    task: Option<JoinHandle<()>>,
    /// A restarted guest application (see `revive_guest_app`).
    revived: Option<JoinHandle<()>>,
    /// Held by the guest's tasks and each of its connections: one count left means all
    /// of them are gone, their sockets closed.
    guest_alive: Arc<()>,
    endpoint: Option<SocketAddr>,
    starts: usize,
    stops: usize,
    /// The last idle history handed over.
    idle_history: Option<String>,
}

/// The fake backend.
pub struct FakeBackend {
    catalog: watch::Sender<Catalog>,
    vms: Mutex<HashMap<VmKey, FakeVm>>,
    options: Arc<Mutex<FakeOptions>>,
}

impl FakeBackend {
    /// A backend with these VMs, all stopped.
    pub fn new(vms: impl IntoIterator<Item = (VmKey, Policy)>, options: FakeOptions) -> Arc<FakeBackend> {
        let catalog: BTreeMap<VmKey, Arc<Policy>> = vms.into_iter().map(|(k, p)| (k, Arc::new(p))).collect();
        let fakes = catalog
            .keys()
            .map(|key| (key.clone(), FakeVm::new()))
            .collect::<HashMap<_, _>>();
        let (catalog, _) = watch::channel(Arc::new(catalog));
        Arc::new(FakeBackend {
            catalog,
            vms: Mutex::new(fakes),
            options: Arc::new(Mutex::new(options)),
        })
    }

    /// Changes how VMs behave from now on.
    pub fn set_options(&self, f: impl FnOnce(&mut FakeOptions)) {
        f(&mut self.options.lock().expect("options lock"));
    }

    /// Adds or replaces a VM in the catalog.
    pub fn add_vm(&self, key: VmKey, policy: Policy) {
        self.vms
            .lock()
            .expect("vms lock")
            .entry(key.clone())
            .or_insert_with(FakeVm::new);
        self.catalog.send_modify(|c| {
            Arc::make_mut(c).insert(key, Arc::new(policy));
        });
    }

    /// How many times the VM was started (or resumed).
    pub fn starts(&self, key: &VmKey) -> usize {
        self.with_vm(key, |vm| vm.starts)
    }

    /// How many times the VM was stopped.
    pub fn stops(&self, key: &VmKey) -> usize {
        self.with_vm(key, |vm| vm.stops)
    }

    /// The idle history the activator last handed over for the VM.
    pub fn idle_history(&self, key: &VmKey) -> Option<String> {
        self.with_vm(key, |vm| vm.idle_history.clone())
    }

    /// Whether the VM's guest is running.
    pub fn is_running(&self, key: &VmKey) -> bool {
        self.with_vm(key, |vm| vm.task.is_some())
    }

    /// The VM's guest log (kept across reboots, as a guest's disk would).
    pub fn guest_log(&self, key: &VmKey) -> Arc<Mutex<GuestLog>> {
        self.with_vm(key, |vm| vm.log.clone())
    }

    /// Event ids the guest accepted.
    pub fn event_ids(&self, key: &VmKey) -> Vec<String> {
        self.guest_log(key).lock().expect("log lock").event_ids.clone()
    }

    /// Simulates the VM dying on its own (crash, guest power-off).
    pub fn crash(&self, key: &VmKey) {
        self.with_vm(key, |vm| {
            if let Some(task) = vm.task.take() {
                task.abort();
            }
            vm.status.send_replace(BackendStatus {
                phase: BackendPhase::Stopped,
                endpoints: Vec::new(),
                message: Some("the VM exited on its own".into()),
            });
        });
    }

    /// The guest application dies while the VM keeps running (connections are refused).
    /// Returns once its connections are closed: the activator serves requests on threads
    /// of its own, and one sent after this returns must find the guest gone.
    pub async fn kill_guest_app(&self, key: &VmKey) {
        let alive = self.with_vm(key, |vm| {
            if let Some(task) = vm.task.take() {
                task.abort();
            }
            if let Some(task) = vm.revived.take() {
                task.abort();
            }
            // Still "running" as far as the backend knows: keep a finished task in place.
            vm.task = Some(tokio::spawn(async {}));
            vm.guest_alive.clone()
        });
        // Aborted tasks are dropped when the runtime next runs them.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while Arc::strong_count(&alive) > 2 {
            assert!(Instant::now() < deadline, "the killed guest's connections never closed");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// The guest application comes back on the same endpoint.
    pub async fn revive_guest_app(&self, key: &VmKey) {
        let (endpoint, log, alive) = self.with_vm(key, |vm| {
            let endpoint = vm.endpoint.expect("the VM was started");
            (endpoint, vm.log.clone(), vm.guest_alive.clone())
        });
        let listener = TcpListener::bind(endpoint).await.expect("endpoint is free again");
        let options = self.options.clone();
        let task = tokio::spawn(serve_guest(listener, log, options, alive));
        self.with_vm(key, |vm| vm.revived = Some(task));
    }

    fn with_vm<T>(&self, key: &VmKey, f: impl FnOnce(&mut FakeVm) -> T) -> T {
        let mut vms = self.vms.lock().expect("vms lock");
        f(vms
            .get_mut(key)
            .unwrap_or_else(|| panic!("fake backend has no VM {key}")))
    }
}

impl FakeVm {
    fn new() -> FakeVm {
        FakeVm {
            status: watch::channel(BackendStatus::stopped()).0,
            log: Arc::default(),
            task: None,
            revived: None,
            guest_alive: Arc::new(()),
            endpoint: None,
            starts: 0,
            stops: 0,
            idle_history: None,
        }
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn catalog(&self) -> watch::Receiver<Catalog> {
        self.catalog.subscribe()
    }

    fn record_idle_history(&self, key: &VmKey, history: &str) {
        self.with_vm(key, |vm| vm.idle_history = Some(history.to_string()));
    }

    fn status(&self, vm: &VmKey) -> Option<watch::Receiver<BackendStatus>> {
        self.vms.lock().expect("vms lock").get(vm).map(|v| v.status.subscribe())
    }

    async fn start(&self, key: &VmKey) -> Result<(), BackendError> {
        let options = self.options.lock().expect("options lock").clone();
        if let Some(message) = options.start_error {
            return Err(BackendError::Failed { op: "start", message });
        }
        // Each boot gets its own loopback address (127.2.x.y; Linux routes all of
        // 127.0.0.0/8 to lo), bound now — so no other server can ever answer in its
        // place — but not listening until "booted": until then connections are refused,
        // as by a guest whose application is not up yet.
        let socket = reserve_guest_socket().map_err(|e| BackendError::Unavailable(e.to_string()))?;
        let endpoint = socket
            .local_addr()
            .map_err(|e| BackendError::Unavailable(e.to_string()))?;
        let mut vms = self.vms.lock().expect("vms lock");
        let vm = vms.get_mut(key).ok_or_else(|| BackendError::NotFound(key.clone()))?;
        if vm.task.is_some() {
            return Ok(());
        }
        vm.starts += 1;
        vm.endpoint = Some(endpoint);
        vm.log.lock().expect("log lock").start_calls.push(Instant::now());
        vm.status.send_replace(BackendStatus {
            phase: BackendPhase::Starting,
            endpoints: Vec::new(),
            message: None,
        });
        let status = vm.status.clone();
        let log = vm.log.clone();
        let live = self.options.clone();
        let alive = vm.guest_alive.clone();
        vm.task = Some(tokio::spawn(async move {
            let started = Instant::now();
            tokio::time::sleep(options.running_delay).await;
            status.send_replace(BackendStatus {
                phase: BackendPhase::Running,
                endpoints: vec![endpoint],
                message: None,
            });
            if options.precise_boot {
                sleep_precisely_until(started + options.boot_delay).await;
            } else {
                tokio::time::sleep_until(started + options.boot_delay).await;
            }
            let listener = match socket.listen(1024) {
                Ok(l) => l,
                Err(e) => {
                    status.send_replace(BackendStatus {
                        phase: BackendPhase::Stopped,
                        endpoints: Vec::new(),
                        message: Some(format!("guest could not listen on {endpoint}: {e}")),
                    });
                    return;
                }
            };
            log.lock().expect("log lock").listening_since.push(Instant::now());
            serve_guest(listener, log, live, alive).await;
        }));
        Ok(())
    }

    async fn stop(&self, key: &VmKey) -> Result<(), BackendError> {
        self.with_vm(key, |vm| {
            for task in [vm.task.take(), vm.revived.take()].into_iter().flatten() {
                task.abort();
            }
            vm.stops += 1;
            vm.status.send_replace(BackendStatus::stopped());
        });
        Ok(())
    }
}
