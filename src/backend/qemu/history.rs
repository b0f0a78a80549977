//! The idle history of each local VM, kept in the configured run directory as
//! `<namespace>_<name>.idle-history` (the text of an `idle_policy::History`): read into
//! the VM's policy at start, rewritten (a new file renamed over the old one) with each
//! idle scale-down. The per-process default run directory does not outlive the process,
//! so without a configured one nothing is kept.

use std::path::{Path, PathBuf};

use crate::config::VmConfig;
use crate::vm::{Policy, VmKey};

/// The idle history file of `key` in `dir`.
fn history_file(dir: &Path, key: &VmKey) -> PathBuf {
    dir.join(format!("{}_{}.idle-history", key.namespace, key.name))
}

/// `vm`'s policy with the idle history stored in `dir`, if there is one (a file that
/// does not parse is a warning, and the fixed idle timeout applies until it is rewritten).
pub(super) fn policy_with_stored(vm: &VmConfig, dir: Option<&Path>) -> Policy {
    let mut policy = vm.policy();
    let Some(dir) = dir else {
        return policy;
    };
    let file = history_file(dir, &vm.key());
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            if let Err(problem) = policy.read_idle_history(text.trim()) {
                tracing::warn!(vm = %vm.key(), file = %file.display(), %problem, "idle history not used");
                policy.warnings.push(format!("{}: {problem}", file.display()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(vm = %vm.key(), file = %file.display(), error = %e, "idle history not read"),
    }
    policy
}

/// Writes `history` as `key`'s file in `dir`; a failure is logged (the next scale-down
/// tries again).
pub(super) fn write(dir: &Path, key: &VmKey, history: &str) {
    let file = history_file(dir, key);
    let partial = file.with_extension("idle-history.new");
    let written = std::fs::write(&partial, format!("{history}\n")).and_then(|()| std::fs::rename(&partial, &file));
    if let Err(e) = written {
        tracing::warn!(vm = %key, file = %file.display(), error = %e, "idle history not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmConfig {
        serde_norway::from_str("namespace: default\nname: demo\nmachine: {kernel: k, initrd: i}\n").unwrap()
    }

    #[test]
    fn a_written_history_is_read_back_into_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        assert!(policy_with_stored(&vm(), Some(dir.path())).idle_history.is_none());
        write(dir.path(), &vm().key(), "v1 bin=1s at=1000 cold=2600ms oob=0 gaps=9:4");
        let policy = policy_with_stored(&vm(), Some(dir.path()));
        assert_eq!(policy.idle_history.unwrap().samples(), 4);
        assert!(policy.warnings.is_empty());
        assert!(
            policy_with_stored(&vm(), None).idle_history.is_none(),
            "no run_dir: nothing kept"
        );
    }

    #[test]
    fn a_file_that_does_not_parse_is_a_warning_and_no_history() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(history_file(dir.path(), &vm().key()), "v1 bin=1s gaps=banana\n").unwrap();
        let policy = policy_with_stored(&vm(), Some(dir.path()));
        assert!(policy.idle_history.is_none());
        assert!(
            policy.warnings[0].contains("default_demo.idle-history"),
            "{:?}",
            policy.warnings
        );
    }
}
