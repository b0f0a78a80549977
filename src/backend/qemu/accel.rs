//! KVM or TCG: `auto` uses KVM only when the CPU advertises VT-x/AMD-V *and*
//! `/dev/kvm` opens (some nested hosts have the device without the flags, and a guest
//! started with KVM there hangs).

use super::BackendError;
use crate::config::Accel;

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

pub(super) fn resolve_accel(accel: Accel, kvm: bool) -> Result<&'static str, BackendError> {
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
