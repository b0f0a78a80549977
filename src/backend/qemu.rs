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
//! Owns: QEMU processes, QMP. The only module that spawns processes.
//! Must not import `activator`, `ingress`, `server`, `gate`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch, Mutex};

use super::{Backend, BackendError, BackendPhase, BackendStatus, Catalog};
use crate::config::{Accel, QemuConfig, VmConfig};
use crate::vm::{Endpoint, VmKey};

/// How long QMP may take to come up after spawn, and to answer one command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// After `quit`, how long before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of QEMU's stderr is kept for error messages.
const STDERR_TAIL: usize = 2048;

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

    /// The QEMU command line for one VM (without the program name).
    fn args(&self, vm: &LocalVm, host_port: u16, qmp: &Path, console: &Path) -> Vec<String> {
        let m = &vm.spec.machine;
        let guest_port = vm.spec.policy().port;
        let mut args = vec![
            "-name".into(),
            format!("{}.{}", vm.key.namespace, vm.key.name),
            "-accel".into(),
            self.accel.into(),
            "-m".into(),
            m.memory_mib.to_string(),
            "-smp".into(),
            m.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            m.kernel.display().to_string(),
            "-initrd".into(),
            m.initrd.display().to_string(),
            "-append".into(),
            m.append.clone(),
            "-serial".into(),
            format!("file:{}", console.display()),
            "-netdev".into(),
            format!("user,id=net0,hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"),
            "-device".into(),
            "virtio-net-pci,netdev=net0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ];
        if self.accel == "kvm" {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args
    }

    async fn spawn(&self, vm: &Arc<LocalVm>) -> Result<Process, BackendError> {
        let fail = |message: String| BackendError::Failed { op: "start", message };
        for file in [&vm.spec.machine.kernel, &vm.spec.machine.initrd] {
            if !file.is_file() {
                return Err(fail(format!(
                    "{} does not exist (build the guest image: deploy/local/build-guest.sh)",
                    file.display()
                )));
            }
        }
        let host_port = free_port().map_err(|e| fail(format!("no free port: {e}")))?;
        let endpoint = Endpoint::from(([127, 0, 0, 1], host_port));
        let stem = format!("{}_{}", vm.key.namespace, vm.key.name);
        let qmp_path = self.run_dir.join(format!("{stem}.qmp"));
        let console = self.run_dir.join(format!("{stem}.console.log"));
        let _ = std::fs::remove_file(&qmp_path);
        let mut command = Command::new(&self.config.binary);
        command
            .args(self.args(vm, host_port, &qmp_path, &console))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL this
        // child if the activator dies, so a crashed activator never leaks VMs.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.config.binary.display())))?;
        tracing::info!(vm = %vm.key, pid = child.id(), %endpoint, accel = self.accel, "QEMU started");
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_tail = Arc::new(std::sync::Mutex::new(String::new()));
        tokio::spawn(collect_tail(stderr, stderr_tail.clone()));

        let (kill_tx, kill_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = watch::channel(false);
        let qmp = Arc::new(Mutex::new(None));
        tokio::spawn(supervise(
            vm.clone(),
            child,
            kill_rx,
            exited_tx,
            stderr_tail,
            qmp.clone(),
            qmp_path,
            endpoint,
        ));
        Ok(Process {
            qmp,
            endpoint,
            kill: Some(kill_tx),
            exited: exited_rx,
        })
    }

    async fn stop_process(&self, vm: &LocalVm, process: &mut Process) {
        let grace = self.config.stop_grace;
        vm.status.send_modify(|s| {
            if s.phase != BackendPhase::Stopped {
                s.phase = BackendPhase::Stopping;
            }
        });
        let exited = process.exited.clone();
        let wait_exit = |limit: Duration| {
            let mut exited = exited.clone();
            async move { tokio::time::timeout(limit, exited.wait_for(|e| *e)).await.is_ok() }
        };
        if *exited.borrow() {
            return;
        }
        // Ask the guest OS to power off (ACPI); a guest that ignores it is quit after the grace period.
        if qmp_execute(&process.qmp, "system_powerdown").await.is_ok() && wait_exit(grace).await {
            return;
        }
        let _ = qmp_execute(&process.qmp, "quit").await;
        if wait_exit(QUIT_TIMEOUT).await {
            return;
        }
        tracing::warn!(vm = %vm.key, "QEMU ignored quit; killing it");
        if let Some(kill) = process.kill.take() {
            let _ = kill.send(());
        }
        let _ = wait_exit(QUIT_TIMEOUT).await;
    }
}

/// Watches one QEMU process: brings up QMP, reports Running once QEMU says the
/// machine runs, then waits for the process to exit (or to be killed) and reports
/// Stopped with the reason.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    vm: Arc<LocalVm>,
    mut child: Child,
    kill: oneshot::Receiver<()>,
    exited: watch::Sender<bool>,
    stderr_tail: Arc<std::sync::Mutex<String>>,
    qmp_slot: Arc<Mutex<Option<Qmp>>>,
    qmp_path: PathBuf,
    endpoint: Endpoint,
) {
    let boot = async {
        let mut qmp = Qmp::connect(&qmp_path).await?;
        let status = qmp.execute("query-status", None).await?;
        *qmp_slot.lock().await = Some(qmp);
        Ok::<_, String>(status)
    };
    tokio::pin!(boot);
    let mut kill = kill;
    let mut booted = false;
    let exit = loop {
        tokio::select! {
            result = &mut boot, if !booted => {
                booted = true;
                match result {
                    Ok(status) => {
                        let running = status.get("running").and_then(Value::as_bool).unwrap_or(false);
                        let phase = if running { BackendPhase::Running } else { BackendPhase::Paused };
                        vm.status.send_modify(|s| {
                            if s.phase == BackendPhase::Starting {
                                *s = BackendStatus { phase, endpoint: Some(endpoint), message: None };
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm.key, error = %e, "QMP did not come up; stopping QEMU");
                        let _ = child.start_kill();
                    }
                }
            }
            status = child.wait() => break status,
            _ = &mut kill => {
                let _ = child.start_kill();
                break child.wait().await;
            }
        }
    };
    let stderr = stderr_tail.lock().map(|s| s.trim().to_string()).unwrap_or_default();
    let message = match exit {
        Ok(status) if status.success() => "QEMU exited".to_string(),
        Ok(status) => format!("QEMU exited with {status}"),
        Err(e) => format!("cannot wait for QEMU: {e}"),
    };
    let message = if stderr.is_empty() {
        message
    } else {
        format!("{message}: {stderr}")
    };
    tracing::info!(vm = %vm.key, %message, "QEMU process ended");
    *qmp_slot.lock().await = None;
    vm.status.send_replace(BackendStatus {
        phase: BackendPhase::Stopped,
        endpoint: None,
        message: Some(message),
    });
    let _ = exited.send(true);
}

async fn collect_tail(mut stderr: tokio::process::ChildStderr, tail: Arc<std::sync::Mutex<String>>) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
        t.push_str(&String::from_utf8_lossy(&buf[..n]));
        if t.len() > STDERR_TAIL {
            let cut = t.len() - STDERR_TAIL;
            let cut = (cut..t.len()).find(|i| t.is_char_boundary(*i)).unwrap_or(t.len());
            t.drain(..cut);
        }
    }
}

async fn qmp_execute(slot: &Mutex<Option<Qmp>>, command: &str) -> Result<Value, String> {
    let mut guard = slot.lock().await;
    let qmp = guard.as_mut().ok_or("QMP is not connected")?;
    qmp.execute(command, None).await
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
            endpoint: None,
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
                    endpoint: None,
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
            endpoint: Some(endpoint),
            message: None,
        });
        Ok(())
    }

    async fn shutdown(&self) {
        let stops = self.vms.keys().map(|key| self.stop(key));
        futures_util::future::join_all(stops).await;
    }
}

/// A minimal QMP client: one connection, commands answered in order, events skipped.
struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and negotiates capabilities.
    async fn connect(path: &Path) -> Result<Qmp, String> {
        let deadline = tokio::time::Instant::now() + QMP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("cannot connect to QMP at {}: {e}", path.display()))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = tokio::time::timeout(QMP_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| "QMP did not answer in time".to_string())?
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP sent invalid JSON: {e}"))
    }

    /// Runs one command and returns its `return` value.
    async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let message = self.read_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(format!("QMP {command}: {error}"));
            }
            // An asynchronous event (SHUTDOWN, POWERDOWN, ...): not our answer.
        }
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether KVM can really be used: the CPU advertises VT-x/AMD-V and /dev/kvm opens.
pub fn kvm_usable() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_has_virtualization(&cpuinfo)
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

fn resolve_accel(accel: Accel, kvm: bool) -> Result<&'static str, BackendError> {
    match (accel, kvm) {
        (Accel::Tcg, _) | (Accel::Auto, false) => Ok("tcg"),
        (Accel::Kvm, true) | (Accel::Auto, true) => Ok("kvm"),
        (Accel::Kvm, false) => Err(BackendError::Unavailable(
            "qemu.accel is kvm but KVM is unusable here (no vmx/svm CPU flag, or /dev/kvm does not open)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_needs_the_cpu_flag_not_just_the_device() {
        assert!(cpu_has_virtualization("flags\t\t: fpu vme de pse vmx sse\n"));
        assert!(cpu_has_virtualization("flags\t\t: fpu svm\n"));
        assert!(!cpu_has_virtualization(
            "flags\t\t: fpu vme hypervisor\nmodel name: vmx-like\n"
        ));
        assert_eq!(resolve_accel(Accel::Auto, false).unwrap(), "tcg");
        assert_eq!(resolve_accel(Accel::Auto, true).unwrap(), "kvm");
        assert_eq!(resolve_accel(Accel::Tcg, true).unwrap(), "tcg");
        assert!(resolve_accel(Accel::Kvm, false).is_err());
    }
}
