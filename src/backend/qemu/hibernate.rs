//! The hibernate tier: a VM's RAM and device state saved to a file under the run
//! directory, its QEMU process ended (its memory freed); the next start runs a new process
//! that loads the file (`-incoming`) and the guest continues where it was.
//!
//! QEMU 7.2 (Debian 12) has no `file:` migration target, so the state is streamed
//! through `exec:cat`: QMP `stop`, then `migrate` to `exec:cat > NAME.partial`, polled
//! with `query-migrate` until it completes. A restore hands QEMU the file itself
//! (`-incoming fd:3`). Pages the guest never wrote (or zeroed) cost
//! a few bytes each in the stream: the file is about the guest's used memory.
//!
//! Safety of a restore, in order:
//! 1. written atomically: `.partial` → synced → renamed to `.state`, and only then the
//!    sidecar `.meta` written the same way — no `.meta`, no restore;
//! 2. the sidecar names what the state belongs to (QEMU's version, kernel and initrd by
//!    size and mtime, the command line that shapes the machine) and the state's size: any
//!    difference (another QEMU, a rebuilt guest image, a truncated file) and the files are
//!    removed and the VM boots;
//! 3. QEMU refusing the stream anyway (a corrupted file): the process exits, the files are
//!    removed and the VM boots. Either way the reason is the VM's status message
//!    (`/v1/vms`) and a warning in the log; the events held meanwhile wait for the boot.
//!
//! A restored state is removed at once (the guest has moved on from it); a VM stopped for
//! good loses its state; a save that would pass the disk budget is refused (the caller
//! stops the VM instead).

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

/// The state file of a VM, its sidecar, and the file being written.
pub(super) struct StateFiles {
    pub(super) state: PathBuf,
    pub(super) meta: PathBuf,
    partial: PathBuf,
}

impl StateFiles {
    /// Removes all three (a missing one is fine).
    pub(super) fn remove(&self) {
        for file in [&self.state, &self.meta, &self.partial, &self.meta_partial()] {
            let _ = std::fs::remove_file(file);
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
                "accel={} memory_mib={} cpus={} port={} append={}",
                self.accel,
                m.memory_mib,
                m.cpus,
                vm.spec.policy().port,
                m.append
            ),
            state_bytes,
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

    /// Bytes of state files other VMs keep.
    fn others_state_bytes(&self, vm: &LocalVm) -> u64 {
        self.vms
            .values()
            .filter(|other| other.key != vm.key)
            .filter_map(|other| std::fs::metadata(self.state_files(other).state).ok())
            .map(|meta| meta.len())
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
        files.remove();
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
        let result = migrate_to(qmp, &files.partial).await;
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
                files.remove();
                if was_running {
                    let _ = qmp.execute("cont", None).await;
                }
                Err(e)
            }
        }
    }
}

/// Streams the (stopped) machine's state into `partial` and waits for the end.
async fn migrate_to(qmp: &mut Qmp, partial: &Path) -> Result<(), String> {
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

/// Makes a written `.partial` the VM's state: synced, renamed, then its sidecar written
/// and renamed the same way. Returns the state's size.
async fn commit(files: &StateFiles, fingerprint: impl Fn() -> Result<Fingerprint, String>) -> Result<u64, String> {
    let partial = files.partial.clone();
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let bytes = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&partial).map_err(|e| io("open the state file", e))?;
        file.sync_all().map_err(|e| io("sync the state file", e))?;
        Ok::<_, String>(file.metadata().map_err(|e| io("stat the state file", e))?.len())
    })
    .await
    .map_err(|e| e.to_string())??;
    if bytes == 0 {
        return Err("QEMU wrote an empty state file".into());
    }
    let mut fingerprint = fingerprint()?;
    fingerprint.state_bytes = bytes;
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
