//! The local QEMU backend, the embedded default: each configured VM is a
//! `qemu-system-x86_64` process with a QMP socket, its guest port forwarded to a free
//! 127.0.0.1 port by QEMU user networking. Start = spawn; stop = QMP
//! `system_powerdown`, then `quit` after a grace period (then SIGKILL); pause/resume =
//! QMP `stop`/`cont`; hibernate = the guest's state saved to a file and the process
//! ended, start = a new process continuing from that file when there is a usable one
//! (`hibernate.rs`). A VM that exits on its own is reported `Stopped` with its exit
//! status and the tail of QEMU's stderr.
//!
//! Long because: the `Backend` impl and the per-VM process table are one piece; the
//! processes, hibernation and the sidecar live in files of their own.
//!
//! Acceleration `auto` uses KVM only when `/proc/cpuinfo` shows `vmx` or `svm` *and*
//! `/dev/kvm` opens: some nested hosts have a `/dev/kvm` without those flags, and a
//! guest started with KVM there hangs.
//!
//! This file has the backend and its trait methods; `process.rs` one VM's QEMU process
//! (command line, spawn, supervision, stop), `hibernate.rs` state files (save, check,
//! restore), `qmp.rs` the QMP client, `accel.rs` the choice of KVM or TCG.
//!
//! Owns: QEMU processes, QMP. The only module that spawns processes.
//! Must not import `activator`, `lifecycle`, `ingress`, `server`.

mod accel;
mod hibernate;
mod history;
mod process;
mod qmp;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// `qemu-system-x86_64 --version`'s first line: a state file belongs to one version.
    qemu_version: String,
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
    /// How the last start went with the hibernated state (restored, or why it booted
    /// instead): shown in `/v1/vms` while the status itself has no message.
    restore_note: std::sync::Mutex<Option<String>>,
    /// Whether the last start was a restore (not a boot).
    restored: std::sync::atomic::AtomicBool,
    /// Where the guest's RAM lives when the VM's plan hibernates it: a file in the run
    /// directory, mapped shared, so a save writes only the device state and a restore
    /// maps the RAM instead of reading it (`hibernate.rs`). `None`: anonymous memory.
    ram_file: Option<PathBuf>,
}

struct Process {
    qmp: Arc<Mutex<Option<Qmp>>>,
    endpoint: Endpoint,
    kill: Option<oneshot::Sender<()>>,
    exited: watch::Receiver<bool>,
    /// What the supervisor reports when the process ends.
    on_exit: Arc<std::sync::Mutex<process::OnExit>>,
    /// The end of QEMU's stderr (why a restore failed).
    stderr_tail: Arc<std::sync::Mutex<String>>,
}

/// How long a restore may take to run the guest before it is given up for a boot.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);

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
        let qemu_version = qemu_version(&config.binary);
        tracing::info!(accel, run_dir = %run_dir.display(), %qemu_version, "local QEMU backend");
        // A configured run directory also keeps each VM's idle history across restarts.
        let histories = config.run_dir.as_deref();
        let catalog: BTreeMap<VmKey, Arc<crate::vm::Policy>> = vms
            .iter()
            .map(|vm| (vm.key(), Arc::new(history::policy_with_stored(vm, histories))))
            .collect();
        let vms = vms
            .into_iter()
            .map(|spec| {
                let key = spec.key();
                let ram_file = spec
                    .policy()
                    .scale_down
                    .hibernates()
                    .then(|| run_dir.join(format!("{}_{}.ram", key.namespace, key.name)));
                let vm = LocalVm {
                    ram_file,
                    key: key.clone(),
                    spec,
                    status: watch::channel(BackendStatus::stopped()).0,
                    process: Mutex::new(None),
                    restore_note: Default::default(),
                    restored: Default::default(),
                };
                (key, Arc::new(vm))
            })
            .collect();
        let backend = QemuBackend {
            config,
            run_dir,
            accel,
            qemu_version,
            catalog: watch::channel(Arc::new(catalog)).0,
            vms,
        };
        // A configured run directory keeps hibernated VMs across restarts of the
        // activator: those are Hibernated from the start.
        for vm in backend.vms.values() {
            match backend.restorable(vm) {
                Ok(Some(_)) => {
                    vm.status.send_modify(|s| s.phase = BackendPhase::Hibernated);
                }
                Ok(None) => {}
                Err(reason) => tracing::warn!(vm = %vm.key, %reason, "hibernated state discarded"),
            }
        }
        Ok(Arc::new(backend))
    }

    /// Starts `vm`'s process: restored from its hibernated state when there is a usable
    /// one, else booted. Called with the VM's process lock held.
    async fn spawn_or_restore(&self, vm: &Arc<LocalVm>) -> Result<Process, BackendError> {
        use std::sync::atomic::Ordering::SeqCst;
        vm.restored.store(false, SeqCst);
        let reason = match self.restorable(vm) {
            Ok(None) => None,
            Ok(Some(state)) => match self.restore(vm, &state).await {
                Ok(process) => {
                    vm.restored.store(true, SeqCst);
                    return Ok(process);
                }
                Err(reason) => Some(reason),
            },
            Err(reason) => Some(reason),
        };
        if let Some(reason) = &reason {
            tracing::warn!(vm = %vm.key, %reason, "hibernated state not used; booting");
            self.note(vm, format!("booted: the hibernated state was not used: {reason}"));
        }
        self.spawn(vm, None).await
    }

    /// Runs a process that loads `state` and waits until the guest runs. On failure the
    /// process is gone, the state files are removed, and the reason is returned.
    async fn restore(&self, vm: &Arc<LocalVm>, state: &std::path::Path) -> Result<Process, String> {
        let started = tokio::time::Instant::now();
        let bytes = std::fs::metadata(state).map(|m| m.len()).unwrap_or(0);
        let mut process = self.spawn(vm, Some(state)).await.map_err(|e| e.to_string())?;
        let mut status = vm.status.subscribe();
        let mut exited = process.exited.clone();
        let outcome = tokio::time::timeout(RESTORE_TIMEOUT, async {
            tokio::select! {
                _ = status.wait_for(|s| s.phase == BackendPhase::Running) => Ok(()),
                _ = exited.wait_for(|e| *e) => {
                    let stderr = process.stderr_tail.lock().map(|s| s.trim().to_string()).unwrap_or_default();
                    Err(format!("QEMU could not load the state: {stderr}"))
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("the restore did not finish within {RESTORE_TIMEOUT:?}")));
        // Either way the state file is spent: the guest has moved on from it (its RAM
        // file, if any, is its memory again), or it is bad.
        let files = self.state_files(vm);
        files.remove_saved();
        match outcome {
            Ok(()) => {
                let took = started.elapsed();
                tracing::info!(vm = %vm.key, bytes, took_ms = took.as_millis() as u64, "restored from the hibernated state");
                let ram = if files.ram.is_some() {
                    ", its RAM mapped from its file,"
                } else {
                    ""
                };
                self.note(
                    vm,
                    format!(
                        "restored from a hibernated state of {} MiB{ram} in {} ms",
                        bytes / (1024 * 1024),
                        took.as_millis()
                    ),
                );
                Ok(process)
            }
            Err(reason) => {
                process::quit(vm, &mut process).await;
                files.remove();
                Err(reason)
            }
        }
    }

    fn note(&self, vm: &LocalVm, note: String) {
        *vm.restore_note.lock().unwrap_or_else(|e| e.into_inner()) = Some(note);
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

    fn record_idle_history(&self, key: &VmKey, history: &str) {
        if let Some(dir) = self.config.run_dir.as_deref() {
            history::write(dir, key, history);
        }
    }

    fn status(&self, vm: &VmKey) -> Option<watch::Receiver<BackendStatus>> {
        self.vms.get(vm).map(|v| v.status.subscribe())
    }

    fn restored(&self, vm: &VmKey) -> bool {
        self.vms
            .get(vm)
            .is_some_and(|vm| vm.restored.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn status_message(&self, vm: &VmKey) -> Option<String> {
        let vm = self.vms.get(vm)?;
        let message = vm.status.borrow().message.clone();
        message.or_else(|| vm.restore_note.lock().unwrap_or_else(|e| e.into_inner()).clone())
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
        match self.spawn_or_restore(vm).await {
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
        // Stopped for good: a hibernated state is spent, and so is the guest's memory.
        let files = self.state_files(vm);
        let had_state = files.exists();
        files.remove();
        if had_state {
            vm.status.send_replace(BackendStatus {
                phase: BackendPhase::Stopped,
                endpoints: Vec::new(),
                message: Some("stopped; the hibernated state was removed".into()),
            });
        }
        Ok(())
    }

    async fn hibernate(&self, key: &VmKey) -> Result<(), BackendError> {
        let vm = self.vm(key)?;
        let fail = |message: String| BackendError::Failed {
            op: "hibernate",
            message,
        };
        let mut process = vm.process.lock().await;
        let Some(mut p) = process.take().filter(|p| !*p.exited.borrow()) else {
            return Err(fail("the VM is not running".into()));
        };
        let saved = match self.save_state(vm, &p.qmp).await {
            Ok(saved) => saved,
            Err(message) => {
                *process = Some(p);
                return Err(fail(message));
            }
        };
        let message = format!(
            "hibernated: {} MiB of state saved in {} ms",
            saved.bytes / (1024 * 1024),
            saved.took.as_millis()
        );
        tracing::info!(vm = %key, bytes = saved.bytes, took_ms = saved.took.as_millis() as u64, "hibernated");
        *p.on_exit.lock().unwrap_or_else(|e| e.into_inner()) = process::OnExit::Publish(BackendStatus {
            phase: BackendPhase::Hibernated,
            endpoints: Vec::new(),
            message: Some(message),
        });
        process::quit(vm, &mut p).await;
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

    /// Stops every running VM (and removes its RAM file). Hibernated states are kept
    /// when the run directory is configured (the next activator restores them) and
    /// removed from the default, per-process one (nothing would ever use them).
    async fn shutdown(&self) {
        let keep_states = self.config.run_dir.is_some();
        let stops = self.vms.values().map(|vm| async move {
            let files = self.state_files(vm);
            if let Some(mut p) = vm.process.lock().await.take() {
                self.stop_process(vm, &mut p).await;
                if !files.state.exists() {
                    files.remove();
                }
            }
            if !keep_states {
                files.remove();
            }
        });
        futures_util::future::join_all(stops).await;
    }
}

/// The first line of `binary --version`, or why there is none.
fn qemu_version(binary: &std::path::Path) -> String {
    match std::process::Command::new(binary).arg("--version").output() {
        Ok(output) => String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("unknown")
            .trim()
            .to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}
