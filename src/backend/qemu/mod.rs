//! The local QEMU backend, the embedded default: each configured VM is a
//! `qemu-system-x86_64` process with a QMP socket, its guest port forwarded to a free
//! 127.0.0.1 port by QEMU user networking. Start = spawn; stop = QMP
//! `system_powerdown`, then `quit` after a grace period (then SIGKILL); pause/resume =
//! QMP `stop`/`cont`. A VM that exits on its own is reported `Stopped` with its exit
//! status and the tail of QEMU's stderr.
//!
//! Acceleration `auto` uses KVM only when `/proc/cpuinfo` shows `vmx` or `svm` *and*
//! `/dev/kvm` opens: some nested hosts have a `/dev/kvm` without those flags, and a
//! guest started with KVM there hangs.
//!
//! This file has the backend and its trait methods; `process.rs` one VM's QEMU process
//! (command line, spawn, supervision, stop), `qmp.rs` the QMP client, `accel.rs` the
//! choice of KVM or TCG.
//!
//! Owns: QEMU processes, QMP. The only module that spawns processes.
//! Must not import `activator`, `lifecycle`, `ingress`, `server`.

mod accel;
mod process;
mod qmp;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{oneshot, watch, Mutex};

pub use accel::kvm_usable;

use super::{Backend, BackendError, BackendPhase, BackendStatus, Catalog};
use crate::config::{QemuConfig, VmConfig};
use crate::vm::{Endpoint, VmKey};
use accel::resolve_accel;
use qmp::{qmp_execute, Qmp};

/// The local QEMU backend.
pub struct QemuBackend {
    config: QemuConfig,
    run_dir: PathBuf,
    accel: &'static str,
    catalog: watch::Sender<Catalog>,
    vms: HashMap<VmKey, Arc<LocalVm>>,
}

struct LocalVm {
    key: VmKey,
    spec: VmConfig,
    status: watch::Sender<BackendStatus>,
    /// The running process, if any. Held across awaits while starting/stopping, so
    /// start and stop of one VM never interleave.
    process: Mutex<Option<Process>>,
}

struct Process {
    qmp: Arc<Mutex<Option<Qmp>>>,
    endpoint: Endpoint,
    kill: Option<oneshot::Sender<()>>,
    exited: watch::Receiver<bool>,
}

impl QemuBackend {
    /// A backend for these VMs. Fails if the run directory cannot be created or KVM
    /// was demanded but is unusable.
    pub fn new(config: QemuConfig, vms: Vec<VmConfig>) -> Result<Arc<QemuBackend>, BackendError> {
        let run_dir = config
            .run_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("vm-activator-{}", std::process::id())));
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| BackendError::Unavailable(format!("cannot create run dir {}: {e}", run_dir.display())))?;
        let accel = resolve_accel(config.accel, kvm_usable())?;
        tracing::info!(accel, run_dir = %run_dir.display(), "local QEMU backend");
        let catalog: BTreeMap<VmKey, Arc<crate::vm::Policy>> =
            vms.iter().map(|vm| (vm.key(), Arc::new(vm.policy()))).collect();
        let vms = vms
            .into_iter()
            .map(|spec| {
                let key = spec.key();
                let vm = LocalVm {
                    key: key.clone(),
                    spec,
                    status: watch::channel(BackendStatus::stopped()).0,
                    process: Mutex::new(None),
                };
                (key, Arc::new(vm))
            })
            .collect();
        Ok(Arc::new(QemuBackend {
            config,
            run_dir,
            accel,
            catalog: watch::channel(Arc::new(catalog)).0,
            vms,
        }))
    }

    fn vm(&self, key: &VmKey) -> Result<&Arc<LocalVm>, BackendError> {
        self.vms.get(key).ok_or_else(|| BackendError::NotFound(key.clone()))
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn catalog(&self) -> watch::Receiver<Catalog> {
        self.catalog.subscribe()
    }

    fn status(&self, vm: &VmKey) -> Option<watch::Receiver<BackendStatus>> {
        self.vms.get(vm).map(|v| v.status.subscribe())
    }

    async fn start(&self, key: &VmKey) -> Result<(), BackendError> {
        let vm = self.vm(key)?;
        let mut process = vm.process.lock().await;
        if let Some(p) = process.as_ref() {
            if !*p.exited.borrow() {
                return Ok(());
            }
        }
        vm.status.send_replace(BackendStatus {
            phase: BackendPhase::Starting,
            endpoints: Vec::new(),
            message: None,
        });
        match self.spawn(vm).await {
            Ok(p) => {
                *process = Some(p);
                Ok(())
            }
            Err(e) => {
                *process = None;
                vm.status.send_replace(BackendStatus {
                    phase: BackendPhase::Stopped,
                    endpoints: Vec::new(),
                    message: Some(e.to_string()),
                });
                Err(e)
            }
        }
    }

    async fn stop(&self, key: &VmKey) -> Result<(), BackendError> {
        let vm = self.vm(key)?;
        let mut process = vm.process.lock().await;
        if let Some(mut p) = process.take() {
            self.stop_process(vm, &mut p).await;
        }
        Ok(())
    }

    async fn pause(&self, key: &VmKey) -> Result<(), BackendError> {
        let vm = self.vm(key)?;
        let process = vm.process.lock().await;
        let p = process.as_ref().ok_or_else(|| BackendError::Failed {
            op: "pause",
            message: "the VM is not running".into(),
        })?;
        qmp_execute(&p.qmp, "stop")
            .await
            .map_err(|message| BackendError::Failed { op: "pause", message })?;
        vm.status.send_modify(|s| s.phase = BackendPhase::Paused);
        Ok(())
    }

    async fn resume(&self, key: &VmKey) -> Result<(), BackendError> {
        let vm = self.vm(key)?;
        let process = vm.process.lock().await;
        let running = process.as_ref().filter(|p| !*p.exited.borrow());
        let Some(p) = running else {
            // The paused VM is gone (killed meanwhile): boot it instead.
            drop(process);
            return self.start(key).await;
        };
        qmp_execute(&p.qmp, "cont")
            .await
            .map_err(|message| BackendError::Failed { op: "resume", message })?;
        let endpoint = p.endpoint;
        vm.status.send_replace(BackendStatus {
            phase: BackendPhase::Running,
            endpoints: vec![endpoint],
            message: None,
        });
        Ok(())
    }

    async fn shutdown(&self) {
        let stops = self.vms.keys().map(|key| self.stop(key));
        futures_util::future::join_all(stops).await;
    }
}
