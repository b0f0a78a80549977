//! The hibernate tier: a VM's RAM and device state kept in files under the run directory,
//! its QEMU process ended (its memory freed); the next start runs a new process that
//! loads them and the guest continues where it was.
//!
//! Two layouts:
//! - **RAM in a file** — a VM whose plan hibernates (`hibernate`, `pause-then-hibernate`,
//!   `hibernate-then-stop`) runs with its RAM in `NAME.ram`, mapped shared
//!   (`memory-backend-file,share=on`). A save migrates with `x-ignore-shared`: the state
//!   file holds only the device state (well under a MiB), the RAM file is synced as it
//!   is; a restore maps the RAM file instead of reading it (Kata's VM templating uses the
//!   same technique). While the VM runs, its RAM file holds what the guest touched.
//! - **Stream** — any other VM hibernated by an operator: RAM and device state streamed
//!   into the state file. Pages the guest never wrote (or zeroed) cost a few bytes each:
//!   the file is about the guest's used memory.
//!
//! QEMU 7.2 (Debian 12) has no `file:` migration target, so the state is streamed
//! through `exec:cat`: QMP `stop`, then `migrate` to `exec:cat > NAME.partial`, polled
//! with `query-migrate` until it completes. A restore hands QEMU the state file itself
//! as fd 3 (`-incoming fd:3`; with the RAM in a file `-incoming defer`, then the
//! capabilities and `migrate-incoming fd:3` over QMP, as the capability must be set
//! first — with `events` among them, so QEMU announces the end of the load with a
//! `MIGRATION` event and nothing polls; `process.rs`).
//!
//! Safety of a restore, in order:
//! 1. written atomically: `.partial` → synced → renamed to `.state`, and only then the
//!    sidecar `.meta` written the same way — no `.meta`, no restore;
//! 2. the sidecar names what the state belongs to (QEMU's version, kernel and initrd by
//!    size and mtime, the command line that shapes the machine and the layout), the
//!    state's size and the RAM file's size and mtime (synced before the sidecar is
//!    written): any difference (another QEMU, a rebuilt guest image, a truncated or
//!    rewritten file) and the files are removed and the VM boots;
//! 3. QEMU refusing the stream anyway (a corrupted file): the process exits, the files are
//!    removed and the VM boots. Either way the reason is the VM's status message
//!    (`/v1/vms`) and a warning in the log; the events held meanwhile wait for the boot.
//!
//! A restored state is removed at once (the guest has moved on from it; its RAM file is
//! the running guest's memory again); a VM stopped for good loses its state and its RAM
//! file; a boot starts from a new, empty RAM file. A save that would pass the disk budget
//! — every hibernated VM's state and RAM files, and this VM's whole RAM — is refused (the
//! caller stops the VM instead).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;

use super::qmp::Qmp;
use super::{LocalVm, QemuBackend};

/// How long a save may take before it is given up (the VM keeps running).
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often `query-migrate` is asked while saving.
const SAVE_POLL: Duration = Duration::from_millis(5);

/// The state file of a VM, its sidecar, the file being written, and the RAM file of the
/// RAM-in-a-file layout.
pub(super) struct StateFiles {
    pub(super) state: PathBuf,
    pub(super) meta: PathBuf,
    partial: PathBuf,
    pub(super) ram: Option<PathBuf>,
}

impl StateFiles {
    /// Removes the saved state: state file, sidecar and partial ones (a missing one is
    /// fine). The RAM file stays: a running or restored guest's memory is in it.
    pub(super) fn remove_saved(&self) {
        for file in [&self.state, &self.meta, &self.partial, &self.meta_partial()] {
            let _ = std::fs::remove_file(file);
        }
    }

    /// Removes the saved state and the RAM file: the guest's memory is not wanted any
    /// more (stopped for good, a state that cannot be used, a new boot).
    pub(super) fn remove(&self) {
        self.remove_saved();
        if let Some(ram) = &self.ram {
            let _ = std::fs::remove_file(ram);
        }
    }

    /// Where the sidecar is written before it is renamed.
    fn meta_partial(&self) -> PathBuf {
        let mut name = self.meta.clone().into_os_string();
        name.push(".partial");
        PathBuf::from(name)
    }

    /// Whether a saved state exists (complete or not).
    pub(super) fn exists(&self) -> bool {
        self.state.exists() || self.meta.exists()
    }
}

/// What a state file belongs to. A restore needs every field equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Fingerprint {
    qemu: String,
    kernel: FileStamp,
    initrd: FileStamp,
    machine: String,
    state_bytes: u64,
    /// The RAM file as synced with the state (RAM-in-a-file layout).
    #[serde(default)]
    ram: Option<FileStamp>,
}

/// A file by size and modification time (a rebuilt guest image differs in one of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    bytes: u64,
    modified_ns: u128,
}

impl FileStamp {
    fn of(path: &Path) -> Result<FileStamp, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(FileStamp {
            bytes: meta.len(),
            modified_ns: modified
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        })
    }
}

/// A finished save.
#[derive(Debug, Clone, Copy)]
pub(super) struct Saved {
    /// Size of the state file.
    pub(super) bytes: u64,
    /// From `stop` to the renamed file.
    pub(super) took: Duration,
}

impl QemuBackend {
    /// The state files of `vm`.
    pub(super) fn state_files(&self, vm: &LocalVm) -> StateFiles {
        // Not `with_extension`: a VM's name may contain dots.
        let with = |ext: &str| self.run_dir.join(format!("{}_{}.{ext}", vm.key.namespace, vm.key.name));
        StateFiles {
            state: with("state"),
            meta: with("state.meta"),
            partial: with("state.partial"),
            ram: vm.ram_file.clone(),
        }
    }

    /// What the state of `vm` would have to belong to (without the state's size).
    fn fingerprint(&self, vm: &LocalVm, state_bytes: u64) -> Result<Fingerprint, String> {
        let m = &vm.spec.machine;
        Ok(Fingerprint {
            qemu: self.qemu_version.clone(),
            kernel: FileStamp::of(&m.kernel)?,
            initrd: FileStamp::of(&m.initrd)?,
            machine: format!(
                "accel={} memory_mib={} cpus={} port={} append={} ram={}",
                self.accel,
                m.memory_mib,
                m.cpus,
                vm.spec.policy().port,
                m.append,
                if vm.ram_file.is_some() { "file" } else { "stream" },
            ),
            state_bytes,
            ram: None,
        })
    }

    /// The state file to restore `vm` from: `Ok(None)` when there is none, `Err(reason)`
    /// (files removed) when there is one that must not be used.
    pub(super) fn restorable(&self, vm: &LocalVm) -> Result<Option<PathBuf>, String> {
        let files = self.state_files(vm);
        if !files.exists() {
            return Ok(None);
        }
        let verdict = (|| {
            let text = std::fs::read_to_string(&files.meta)
                .map_err(|e| format!("state file has no sidecar ({e}): it was not written completely"))?;
            let saved: Fingerprint =
                serde_json::from_str(&text).map_err(|e| format!("state sidecar is unreadable: {e}"))?;
            let bytes = std::fs::metadata(&files.state)
                .map_err(|e| format!("state file is missing: {e}"))?
                .len();
            let now = self.fingerprint(vm, bytes)?;
            if saved.state_bytes != bytes {
                return Err(format!(
                    "state file is {bytes} bytes, {} were written: truncated or replaced",
                    saved.state_bytes
                ));
            }
            if saved.qemu != now.qemu {
                return Err(format!("state was saved by {}, this is {}", saved.qemu, now.qemu));
            }
            if saved.kernel != now.kernel || saved.initrd != now.initrd {
                return Err("the guest image changed since the state was saved".into());
            }
            if saved.machine != now.machine {
                return Err(format!(
                    "the machine changed since the state was saved ({} → {})",
                    saved.machine, now.machine
                ));
            }
            if let Some(ram) = &files.ram {
                let stamp = FileStamp::of(ram).map_err(|e| format!("the RAM file is missing: {e}"))?;
                if saved.ram.as_ref() != Some(&stamp) {
                    return Err("the RAM file changed since the state was saved".into());
                }
            }
            Ok(files.state.clone())
        })();
        match verdict {
            Ok(state) => Ok(Some(state)),
            Err(reason) => {
                files.remove();
                Err(reason)
            }
        }
    }

    /// Bytes other hibernated VMs keep on disk: their state files and, with the RAM in
    /// a file, their RAM files.
    fn others_state_bytes(&self, vm: &LocalVm) -> u64 {
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |m| m.len());
        self.vms
            .values()
            .filter(|other| other.key != vm.key)
            .map(|other| self.state_files(other))
            .filter(|files| files.state.exists())
            .map(|files| size(&files.state) + files.ram.as_deref().map_or(0, size))
            .sum()
    }

    /// Saves the running (or paused) VM's state to its state file, atomically; the VM is
    /// left paused (the caller ends it). On failure nothing is left on disk and the VM is
    /// running again if it was.
    pub(super) async fn save_state(&self, vm: &LocalVm, qmp: &Mutex<Option<Qmp>>) -> Result<Saved, String> {
        let budget = self.config.hibernate_disk_budget_mib.saturating_mul(1024 * 1024);
        // A state file is at most the guest's RAM (plus a little): refuse up front rather
        // than fill the disk.
        let worst = u64::from(vm.spec.machine.memory_mib) * 1024 * 1024;
        let others = self.others_state_bytes(vm);
        if others.saturating_add(worst) > budget {
            return Err(format!(
                "the hibernate disk budget ({} MiB) would be exceeded: other VMs keep {} MiB, this one may need {} MiB",
                self.config.hibernate_disk_budget_mib,
                others / (1024 * 1024),
                vm.spec.machine.memory_mib
            ));
        }
        let files = self.state_files(vm);
        files.remove_saved();
        let started = tokio::time::Instant::now();
        let mut guard = qmp.lock().await;
        let qmp = guard.as_mut().ok_or("QMP is not connected")?;
        let was_running = qmp
            .execute("query-status", None)
            .await?
            .get("running")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        qmp.execute("stop", None).await?;
        let result = migrate_to(qmp, &files.partial, files.ram.is_some()).await;
        let result = match result {
            Ok(()) => commit(&files, || self.fingerprint(vm, 0)).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(bytes) => Ok(Saved {
                bytes,
                took: started.elapsed(),
            }),
            Err(e) => {
                files.remove_saved();
                if was_running {
                    let _ = qmp.execute("cont", None).await;
                }
                Err(e)
            }
        }
    }
}

/// Streams the (stopped) machine's state into `partial` and waits for the end; with
/// `ram_in_file`, only the device state (`x-ignore-shared`: the RAM stays in its file).
async fn migrate_to(qmp: &mut Qmp, partial: &Path, ram_in_file: bool) -> Result<(), String> {
    if ram_in_file {
        qmp.execute("migrate-set-capabilities", Some(ignore_shared())).await?;
    }
    let target = format!("exec:cat > {}", shell_quote(&partial.display().to_string()));
    qmp.execute("migrate", Some(json!({ "uri": target }))).await?;
    let deadline = tokio::time::Instant::now() + SAVE_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info.get("status").and_then(serde_json::Value::as_str) {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => {
                let why = info
                    .get("error-desc")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("no reason given");
                return Err(format!("saving the state {status}: {why}"));
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(format!("saving the state took longer than {SAVE_TIMEOUT:?}"));
        }
        tokio::time::sleep(SAVE_POLL).await;
    }
}

/// The migration capability that leaves shared RAM (the RAM file) out of the stream; set
/// on both sides.
pub(super) fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// A restore's capabilities: [`ignore_shared`]'s, and `events` — QEMU announces the end
/// of the load with a `MIGRATION` event instead of being asked until it is done.
pub(super) fn incoming_capabilities() -> serde_json::Value {
    let mut capabilities = ignore_shared();
    if let Some(list) = capabilities["capabilities"].as_array_mut() {
        list.push(json!({ "capability": "events", "state": true }));
    }
    capabilities
}

/// Makes a written `.partial` the VM's state: synced (with the RAM file, if any),
/// renamed, then its sidecar written and renamed the same way. Returns the state's size.
async fn commit(files: &StateFiles, fingerprint: impl Fn() -> Result<Fingerprint, String>) -> Result<u64, String> {
    let (partial, ram) = (files.partial.clone(), files.ram.clone());
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let (bytes, ram) = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&partial).map_err(|e| io("open the state file", e))?;
        file.sync_all().map_err(|e| io("sync the state file", e))?;
        let bytes = file.metadata().map_err(|e| io("stat the state file", e))?.len();
        let ram = match &ram {
            Some(ram) => {
                // The guest's memory is on disk once its dirty pages are written back.
                let file = std::fs::File::open(ram).map_err(|e| io("open the RAM file", e))?;
                file.sync_all().map_err(|e| io("sync the RAM file", e))?;
                Some(FileStamp::of(ram)?)
            }
            None => None,
        };
        Ok::<_, String>((bytes, ram))
    })
    .await
    .map_err(|e| e.to_string())??;
    if bytes == 0 {
        return Err("QEMU wrote an empty state file".into());
    }
    let mut fingerprint = fingerprint()?;
    fingerprint.state_bytes = bytes;
    fingerprint.ram = ram;
    std::fs::rename(&files.partial, &files.state).map_err(|e| io("rename the state file", e))?;
    let meta_partial = files.meta_partial();
    let text = serde_json::to_vec_pretty(&fingerprint).map_err(|e| e.to_string())?;
    let written = (|| {
        use std::io::Write;
        let mut file = std::fs::File::create(&meta_partial)?;
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&meta_partial, &files.meta)?;
        // The renames themselves are durable once the directory is synced.
        if let Some(dir) = files.meta.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok::<_, std::io::Error>(())
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&meta_partial);
        io("write the state sidecar", e)
    })?;
    Ok(bytes)
}

/// `text` as one POSIX shell word.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("/run/a b.state"), "'/run/a b.state'");
        assert_eq!(shell_quote("/it's"), r"'/it'\''s'");
    }
}
