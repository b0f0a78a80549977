//! One VM's QEMU process: its command line, spawning it (with a parent-death signal,
//! so a killed activator never leaks VMs), supervising it until it exits, and stopping
//! it (ACPI power-down, then `quit`, then SIGKILL).
//!
//! The QMP socket is bound by the activator before QEMU starts and handed to it as
//! fd 4 (as libvirt does): the connection is made at once and answered as soon as QEMU
//! is up, with no polling for a socket file. A restore's state file is fd 3.
//!
//! Long because: the command line, the descriptor hand-off and the supervisor's two
//! ways up (boot; restore with its load) are one process's life and read best together.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch, Mutex};

use super::qmp::{qmp_execute, Qmp};
use super::{LocalVm, Process, QemuBackend};
use crate::backend::{BackendError, BackendPhase, BackendStatus};
use crate::vm::Endpoint;

/// After `quit`, how long before SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// The descriptor a restoring QEMU reads its state from (`-incoming fd:3`).
const INCOMING_FD: i32 = 3;
/// The descriptor of the QMP socket, bound and listening before QEMU starts.
const QMP_FD: i32 = 4;
/// Descriptors handed to the child are first moved at or above this, so that putting
/// one in its place (3, 4) can never overwrite another still to be moved.
const HANDOFF_FLOOR: i32 = 10;
/// How often a QEMU restoring from `-incoming fd:` (RAM in the stream) is asked whether
/// the guest runs yet. A deferred restore (RAM in its file) waits for QEMU's event.
const INCOMING_POLL: Duration = Duration::from_millis(2);
/// How much of QEMU's stderr is kept for error messages.
const STDERR_TAIL: usize = 2048;

impl QemuBackend {
    /// The QEMU command line for one VM (without the program name).
    fn args(&self, vm: &LocalVm, host_port: u16, console: &Path, incoming: Option<&Path>) -> Vec<String> {
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
            // QMP on the socket the activator bound (fd 4, see `spawn`): it accepts
            // connections before QEMU is up, so nothing polls for a socket file.
            "-chardev".into(),
            format!("socket,id=qmp,fd={QMP_FD},server=on,wait=off"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ];
        if self.accel == "kvm" {
            args.extend(["-cpu".into(), "host".into()]);
        }
        if let Some(ram) = &vm.ram_file {
            // The guest's RAM in a file, mapped shared (hibernate.rs).
            args.extend([
                "-object".into(),
                format!(
                    "memory-backend-file,id=ram,size={}M,mem-path={},share=on",
                    m.memory_mib,
                    ram.display()
                ),
                "-machine".into(),
                "memory-backend=ram".into(),
            ]);
        }
        match (incoming.is_some(), vm.ram_file.is_some()) {
            // The state file, opened by the activator, is the child's fd 3 (see `spawn`):
            // QEMU reads it directly — no `cat` process, no pipe to copy through.
            (true, false) => args.extend(["-incoming".into(), format!("fd:{INCOMING_FD}")]),
            // The same fd, read once the RAM is marked ignored over QMP (`supervise`).
            (true, true) => args.extend(["-incoming".into(), "defer".into()]),
            (false, _) => {}
        }
        args
    }

    /// Spawns the VM's QEMU process: a boot, or with `incoming` a restore from that
    /// state file (reported Running only once the state is loaded and the guest runs; a
    /// process that ends before is not reported at all — the caller boots instead).
    pub(super) async fn spawn(&self, vm: &Arc<LocalVm>, incoming: Option<&Path>) -> Result<Process, BackendError> {
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
        let qmp_listener = std::os::unix::net::UnixListener::bind(&qmp_path)
            .map_err(|e| fail(format!("cannot bind the QMP socket {}: {e}", qmp_path.display())))?;
        if let (None, Some(ram)) = (incoming, &vm.ram_file) {
            // A boot starts from new, empty memory.
            let _ = std::fs::remove_file(ram);
        }
        let mut command = Command::new(&self.config.binary);
        command
            .args(self.args(vm, host_port, &console, incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let state = match incoming {
            Some(path) => Some(
                std::fs::File::open(path)
                    .map_err(|e| fail(format!("cannot open the state {}: {e}", path.display())))?,
            ),
            None => None,
        };
        let handoff = |fd: &dyn AsFd, what: &str| {
            above_floor(fd.as_fd()).map_err(|e| fail(format!("cannot pass the {what} to QEMU: {e}")))
        };
        let qmp_fd = handoff(&qmp_listener, "QMP socket")?;
        let state_fd = match &state {
            Some(file) => Some(handoff(file, "state file")?),
            None => None,
        };
        // The child's copies: fd 4 the QMP socket, fd 3 the state file.
        let moves = [
            (Some(qmp_fd.as_raw_fd()), QMP_FD),
            (state_fd.as_ref().map(AsRawFd::as_raw_fd), INCOMING_FD),
        ];
        // SAFETY: prctl and dup2 are async-signal-safe. prctl only asks the kernel to
        // SIGKILL this child if the activator dies, so a crashed activator never leaks
        // VMs; dup2 puts each handed-off descriptor (all above the targets) in its place,
        // without close-on-exec.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                for (from, to) in moves {
                    if let Some(from) = from {
                        if libc::dup2(from, to) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.config.binary.display())))?;
        tracing::info!(vm = %vm.key, pid = child.id(), %endpoint, accel = self.accel, "QEMU started");
        // The child has its own copies of the state file and the QMP socket.
        drop((state, state_fd, qmp_listener, qmp_fd));
        let stderr = child.stderr.take().expect("stderr is piped");
        let stderr_tail = Arc::new(std::sync::Mutex::new(String::new()));
        tokio::spawn(collect_tail(stderr, stderr_tail.clone()));

        let (kill_tx, kill_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = watch::channel(false);
        let qmp = Arc::new(Mutex::new(None));
        let on_exit = Arc::new(std::sync::Mutex::new(if incoming.is_some() {
            OnExit::Silent
        } else {
            OnExit::Report
        }));
        tokio::spawn(supervise(Supervised {
            vm: vm.clone(),
            child,
            kill: kill_rx,
            exited: exited_tx,
            stderr_tail: stderr_tail.clone(),
            qmp_slot: qmp.clone(),
            qmp_path,
            endpoint,
            on_exit: on_exit.clone(),
            restoring: incoming.is_some(),
            deferred_incoming: incoming.is_some() && vm.ram_file.is_some(),
        }));
        Ok(Process {
            qmp,
            endpoint,
            kill: Some(kill_tx),
            exited: exited_rx,
            on_exit,
            stderr_tail,
        })
    }

    pub(super) async fn stop_process(&self, vm: &LocalVm, process: &mut Process) {
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
        quit(vm, process).await;
    }
}

/// Ends a QEMU process at once: QMP `quit`, then SIGKILL if it ignores that.
pub(super) async fn quit(vm: &LocalVm, process: &mut Process) {
    let wait_exit = |limit: Duration| {
        let mut exited = process.exited.clone();
        async move { tokio::time::timeout(limit, exited.wait_for(|e| *e)).await.is_ok() }
    };
    if *process.exited.borrow() {
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

/// What the supervisor reports when the process ends.
#[derive(Debug, Clone)]
pub(super) enum OnExit {
    /// `Stopped`, with the exit status and the tail of stderr.
    Report,
    /// Nothing: a restore that has not run yet (its caller boots instead).
    Silent,
    /// This status (e.g. `Hibernated` after a save).
    Publish(BackendStatus),
}

/// What `supervise` watches.
struct Supervised {
    vm: Arc<LocalVm>,
    child: Child,
    kill: oneshot::Receiver<()>,
    exited: watch::Sender<bool>,
    stderr_tail: Arc<std::sync::Mutex<String>>,
    qmp_slot: Arc<Mutex<Option<Qmp>>>,
    qmp_path: PathBuf,
    endpoint: Endpoint,
    on_exit: Arc<std::sync::Mutex<OnExit>>,
    /// Loading a saved state (`-incoming`) rather than booting.
    restoring: bool,
    /// The state is to be loaded over QMP (`-incoming defer`), the RAM left in its file.
    deferred_incoming: bool,
}

/// Watches one QEMU process: brings up QMP, reports Running once QEMU says the
/// machine runs (for a restore: once the state is loaded), then waits for the process to
/// exit (or to be killed) and reports what `on_exit` says.
async fn supervise(supervised: Supervised) {
    let Supervised {
        vm,
        mut child,
        kill,
        exited,
        stderr_tail,
        qmp_slot,
        qmp_path,
        endpoint,
        on_exit,
        restoring,
        deferred_incoming,
    } = supervised;
    let boot = async {
        let mut qmp = Qmp::connect(&qmp_path).await?;
        if deferred_incoming {
            qmp.execute(
                "migrate-set-capabilities",
                Some(super::hibernate::incoming_capabilities()),
            )
            .await?;
            let uri = json!({ "uri": format!("fd:{INCOMING_FD}") });
            qmp.execute("migrate-incoming", Some(uri)).await?;
            // QEMU says when the state is loaded: no polling. (A load that fails ends
            // the process, which ends this wait too.)
            let done = qmp
                .wait_event("MIGRATION", |data| {
                    matches!(
                        data.get("status").and_then(Value::as_str),
                        Some("completed" | "failed" | "cancelled")
                    )
                })
                .await?;
            if done.get("status").and_then(Value::as_str) != Some("completed") {
                return Err(format!("loading the saved state ended {done}"));
            }
        }
        let mut status = qmp.execute("query-status", None).await?;
        // Loading a saved state: QEMU says `inmigrate` until it is loaded. The state was
        // saved stopped, and QEMU keeps a guest that was stopped at the source stopped:
        // a restore continues it.
        if restoring {
            while status.get("status").and_then(Value::as_str) == Some("inmigrate") {
                tokio::time::sleep(INCOMING_POLL).await;
                status = qmp.execute("query-status", None).await?;
            }
            if status.get("running").and_then(Value::as_bool) != Some(true) {
                qmp.execute("cont", None).await?;
                // `cont` answers once the guest runs.
                status = json!({ "running": true, "status": "running" });
            }
        }
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
                        let mut on_exit = on_exit.lock().unwrap_or_else(|e| e.into_inner());
                        if matches!(*on_exit, OnExit::Silent) {
                            *on_exit = OnExit::Report;
                        }
                        drop(on_exit);
                        vm.status.send_modify(|s| {
                            if s.phase == BackendPhase::Starting {
                                *s = BackendStatus { phase, endpoints: vec![endpoint], message: None };
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
    let report = on_exit.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match report {
        OnExit::Report => {
            vm.status.send_replace(BackendStatus {
                phase: BackendPhase::Stopped,
                endpoints: Vec::new(),
                message: Some(message),
            });
        }
        OnExit::Silent => {}
        OnExit::Publish(status) => {
            vm.status.send_replace(status);
        }
    }
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

/// A close-on-exec copy of `fd` numbered at least [`HANDOFF_FLOOR`].
fn above_floor(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, owned by nothing else.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HANDOFF_FLOOR) };
    if raw == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor just made and owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

pub(super) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
