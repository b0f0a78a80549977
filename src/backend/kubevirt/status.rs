//! A VM's phase and guest endpoint as its VirtualMachine and VirtualMachineInstance
//! show them.

use std::net::{IpAddr, SocketAddr};

use kube::Resource;

use super::{VirtualMachine, VirtualMachineInstance};
use crate::backend::{BackendPhase, BackendStatus};

/// What the backend reports for one VM, from its VM and VMI objects.
pub(super) fn derive_status(
    vm: Option<&VirtualMachine>,
    vmi: Option<&VirtualMachineInstance>,
    port: u16,
) -> BackendStatus {
    let status = |phase, endpoint: Option<SocketAddr>, message: Option<String>| BackendStatus {
        phase,
        endpoints: endpoint.into_iter().collect(),
        message,
    };
    if let Some(vmi) = vmi {
        if vmi.meta().deletion_timestamp.is_some() {
            return status(BackendPhase::Stopping, None, None);
        }
        let s = vmi.status.clone().unwrap_or_default();
        let paused = s.conditions.iter().any(|c| c.type_ == "Paused" && c.status == "True");
        let endpoint = s
            .interfaces
            .first()
            .and_then(|i| i.ip_address.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, port));
        return match s.phase.as_deref() {
            Some("Running") if paused => status(BackendPhase::Paused, endpoint, None),
            Some("Running") if endpoint.is_some() => status(BackendPhase::Running, endpoint, None),
            Some("Succeeded") | Some("Failed") => status(
                BackendPhase::Stopped,
                None,
                Some(format!(
                    "VirtualMachineInstance {}",
                    s.phase.as_deref().unwrap_or_default()
                )),
            ),
            _ => status(BackendPhase::Starting, None, None),
        };
    }
    let Some(vm) = vm else {
        return status(BackendPhase::Stopped, None, Some("the VirtualMachine is gone".into()));
    };
    let wants_running = match vm.spec.run_strategy.as_deref() {
        Some("Always") | Some("RerunOnFailure") | Some("Once") => true,
        Some(_) => false,
        None => vm.spec.running == Some(true),
    };
    if wants_running {
        status(BackendPhase::Starting, None, None)
    } else {
        status(BackendPhase::Stopped, None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kubevirt::{VirtualMachineSpec, VmiCondition, VmiInterface, VmiSpec, VmiStatus};

    fn vm(run_strategy: Option<&str>, running: Option<bool>) -> VirtualMachine {
        VirtualMachine::new(
            "demo",
            VirtualMachineSpec {
                run_strategy: run_strategy.map(str::to_string),
                running,
            },
        )
    }

    fn vmi(phase: &str, ip: Option<&str>, paused: bool) -> VirtualMachineInstance {
        let mut vmi = VirtualMachineInstance::new("demo", VmiSpec {});
        vmi.status = Some(VmiStatus {
            phase: Some(phase.into()),
            interfaces: ip
                .map(|ip| VmiInterface {
                    ip_address: Some(ip.into()),
                })
                .into_iter()
                .collect(),
            conditions: paused
                .then(|| VmiCondition {
                    type_: "Paused".into(),
                    status: "True".into(),
                })
                .into_iter()
                .collect(),
        });
        vmi
    }

    #[test]
    fn status_table() {
        let halted = vm(Some("Halted"), None);
        let always = vm(Some("Always"), None);
        let legacy = vm(None, Some(true));
        let cases = [
            ("halted, no VMI", Some(&halted), None, BackendPhase::Stopped),
            ("always, no VMI yet", Some(&always), None, BackendPhase::Starting),
            ("deprecated running: true", Some(&legacy), None, BackendPhase::Starting),
            (
                "pending",
                Some(&always),
                Some(vmi("Pending", None, false)),
                BackendPhase::Starting,
            ),
            (
                "scheduled",
                Some(&always),
                Some(vmi("Scheduled", None, false)),
                BackendPhase::Starting,
            ),
            (
                "running without IP",
                Some(&always),
                Some(vmi("Running", None, false)),
                BackendPhase::Starting,
            ),
            (
                "running with IP",
                Some(&always),
                Some(vmi("Running", Some("10.0.0.7"), false)),
                BackendPhase::Running,
            ),
            (
                "paused",
                Some(&always),
                Some(vmi("Running", Some("10.0.0.7"), true)),
                BackendPhase::Paused,
            ),
            (
                "failed",
                Some(&always),
                Some(vmi("Failed", None, false)),
                BackendPhase::Stopped,
            ),
            ("VM deleted", None, None, BackendPhase::Stopped),
        ];
        for (name, vm, vmi, phase) in cases {
            let status = derive_status(vm, vmi.as_ref(), 9000);
            assert_eq!(status.phase, phase, "{name}");
            if phase == BackendPhase::Running {
                assert_eq!(status.endpoints, vec!["10.0.0.7:9000".parse().unwrap()]);
            }
        }
    }
}
