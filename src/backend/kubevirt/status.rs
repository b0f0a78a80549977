//! A VM's phase and guest endpoint as its VirtualMachine and VirtualMachineInstance
//! show them: the first interface's address, or with `vm-activator.io/network` the
//! address of the VMI interface the VM attached to that Multus network.

use std::net::{IpAddr, SocketAddr};

use kube::Resource;

use super::{VirtualMachine, VirtualMachineInstance};
use crate::backend::{BackendPhase, BackendStatus};

/// What the backend reports for one VM, from its VM and VMI objects. `network` is the
/// qualified Multus network (`namespace/name`) the guest is reached on, if not the first
/// interface.
pub(super) fn derive_status(
    vm: Option<&VirtualMachine>,
    vmi: Option<&VirtualMachineInstance>,
    port: u16,
    network: Option<&str>,
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
        let interface = match network {
            None => Ok(s.interfaces.first()),
            Some(network) => match vm.and_then(|vm| multus_interface(vm, network)) {
                Some(name) => Ok(s.interfaces.iter().find(|i| i.name.as_deref() == Some(name))),
                None => Err(format!("the VirtualMachine has no interface on network {network}")),
            },
        };
        let (interface, not_attached) = match interface {
            Ok(interface) => (interface, None),
            Err(message) => (None, Some(message)),
        };
        let endpoint = interface
            .and_then(|i| i.ip_address.as_deref())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, port));
        let waiting = || match (network, &not_attached) {
            (_, Some(message)) => Some(message.clone()),
            (Some(network), None) => Some(format!("no address on network {network} yet")),
            (None, None) => None,
        };
        return match s.phase.as_deref() {
            Some("Running") if paused => status(BackendPhase::Paused, endpoint, None),
            Some("Running") if endpoint.is_some() => status(BackendPhase::Running, endpoint, None),
            Some("Running") => status(BackendPhase::Starting, None, waiting()),
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

/// The VM's interface attached to the Multus network `network` (`namespace/name`).
fn multus_interface<'a>(vm: &'a VirtualMachine, network: &str) -> Option<&'a str> {
    let namespace = vm.meta().namespace.as_deref().unwrap_or_default();
    vm.spec
        .template
        .as_ref()?
        .spec
        .networks
        .iter()
        .find(|n| {
            n.multus.as_ref().is_some_and(|m| {
                let name = &m.network_name;
                name == network || (!name.contains('/') && format!("{namespace}/{name}") == network)
            })
        })
        .map(|n| n.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kubevirt::resources::{MultusNetwork, VmNetwork, VmTemplate, VmTemplateSpec};
    use crate::backend::kubevirt::{VirtualMachineSpec, VmiCondition, VmiInterface, VmiSpec, VmiStatus};

    fn vm(run_strategy: Option<&str>, running: Option<bool>) -> VirtualMachine {
        VirtualMachine::new(
            "demo",
            VirtualMachineSpec {
                run_strategy: run_strategy.map(str::to_string),
                running,
                template: None,
            },
        )
    }

    fn vmi(phase: &str, ip: Option<&str>, paused: bool) -> VirtualMachineInstance {
        let mut vmi = VirtualMachineInstance::new("demo", VmiSpec {});
        vmi.status = Some(VmiStatus {
            phase: Some(phase.into()),
            interfaces: ip
                .map(|ip| VmiInterface {
                    name: Some("default".into()),
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
            let status = derive_status(vm, vmi.as_ref(), 9000, None);
            assert_eq!(status.phase, phase, "{name}");
            if phase == BackendPhase::Running {
                assert_eq!(status.endpoints, vec!["10.0.0.7:9000".parse().unwrap()]);
            }
        }
    }

    #[test]
    fn a_multus_network_picks_its_interface_and_nothing_else() {
        let mut vm = vm(Some("Always"), None);
        vm.metadata.namespace = Some("apps".into());
        vm.spec.template = Some(VmTemplate {
            spec: VmTemplateSpec {
                networks: vec![
                    VmNetwork {
                        name: "default".into(),
                        multus: None,
                    },
                    VmNetwork {
                        name: "vlan".into(),
                        multus: Some(MultusNetwork {
                            network_name: "vlan-10".into(),
                        }),
                    },
                ],
            },
        });
        let mut vmi = vmi("Running", Some("10.0.0.7"), false);
        let on_pod_network_only = derive_status(Some(&vm), Some(&vmi), 80, Some("apps/vlan-10"));
        assert_eq!(on_pod_network_only.phase, BackendPhase::Starting);
        assert!(on_pod_network_only.endpoints.is_empty(), "never the wrong network");
        assert!(on_pod_network_only
            .message
            .unwrap()
            .contains("no address on network apps/vlan-10"));

        let status = vmi.status.as_mut().unwrap();
        status.interfaces.push(VmiInterface {
            name: Some("vlan".into()),
            ip_address: Some("192.168.10.5".into()),
        });
        let on_vlan = derive_status(Some(&vm), Some(&vmi), 80, Some("apps/vlan-10"));
        assert_eq!(on_vlan.phase, BackendPhase::Running);
        assert_eq!(on_vlan.endpoints, vec!["192.168.10.5:80".parse().unwrap()]);

        let elsewhere = derive_status(Some(&vm), Some(&vmi), 80, Some("infra/storage"));
        assert_eq!(elsewhere.phase, BackendPhase::Starting);
        assert!(elsewhere
            .message
            .unwrap()
            .contains("no interface on network infra/storage"));
    }
}
