//! The simulated controllers' loop (workloads in `workloads.rs`), and virt-controller: a
//! VM whose `runStrategy` becomes `Always` (or `running: true`) gets a VMI that goes
//! Pending → Scheduled → Running with an address on 127.0.0.0/8, where a guest HTTP
//! server starts listening a little later; `Halted` (or deleting the VM) deletes the VMI
//! and its guest.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::guest::reserve_socket;
use crate::{multus_interface, Guest, Inner, Options, Res};

pub(crate) fn wants_running(vm: &Value) -> bool {
    match vm["spec"]["runStrategy"].as_str() {
        Some("Always" | "RerunOnFailure" | "Once") => true,
        Some(_) => false,
        None => vm["spec"]["running"].as_bool() == Some(true),
    }
}

pub(crate) async fn virt_controller(inner: std::sync::Weak<Inner>) {
    let Some(mut changes) = inner.upgrade().map(|i| i.changes.subscribe()) else {
        return;
    };
    loop {
        let change = match changes.recv().await {
            Ok(c) => c,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let meta = &change.object["metadata"];
        let ns = meta["namespace"].as_str().unwrap_or_default().to_string();
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        match change.res {
            Res::Vm => reconcile(&inner, &ns, &name),
            // A VMI gone (its guest crashed): a VM that should run gets a new one.
            Res::Vmi if change.kind == "DELETED" => reconcile(&inner, &ns, &name),
            res if res.scalable() => crate::workloads::reconcile_workload(&inner, res, &ns, &name),
            // A pod gone: its workload replaces it.
            Res::Pod if change.kind == "DELETED" => {
                let owner = &meta["ownerReferences"][0];
                if let (Some(res), Some(workload)) =
                    (owner["kind"].as_str().and_then(Res::from_kind), owner["name"].as_str())
                {
                    crate::workloads::reconcile_workload(&inner, res, &ns, workload);
                }
            }
            _ => {}
        }
    }
}

pub(crate) fn reconcile(inner: &Arc<Inner>, ns: &str, name: &str) {
    let vm = inner.get(Res::Vm, ns, name);
    let vmi = inner.get(Res::Vmi, ns, name);
    let desired = vm.as_ref().is_some_and(wants_running);
    let options = inner.options.lock().unwrap().clone();
    match (desired, vmi) {
        (true, None) => {
            let vm = vm.expect("desired implies the VM exists");
            let port = vm["metadata"]["annotations"]["vm-activator.io/port"]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or(8080u16);
            let multus = multus_interface(&vm);
            let vmi = json!({
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {
                    "name": name, "namespace": ns,
                    "ownerReferences": [{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": name, "uid": vm["metadata"]["uid"], "controller": true}],
                },
                "spec": {"domain": {"devices": {}}},
                "status": {"phase": "Pending"},
            });
            let created = inner.write(Res::Vmi, ns, name, Some(vmi)).expect("created");
            *inner
                .vmi_creations
                .lock()
                .unwrap()
                .entry((ns.to_string(), name.to_string()))
                .or_default() += 1;
            let uid = created["metadata"]["uid"].clone();
            tokio::spawn(boot(
                Arc::downgrade(inner),
                ns.to_string(),
                name.to_string(),
                uid,
                port,
                multus,
                options,
            ));
        }
        (false, Some(_)) => {
            let (inner, ns, name) = (Arc::downgrade(inner), ns.to_string(), name.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(options.stop_delay).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                if let Some(guest) = inner.guests.lock().unwrap().remove(&(ns.clone(), name.clone())) {
                    guest.task.abort();
                }
                let still_halted = inner.get(Res::Vm, &ns, &name).is_none_or(|vm| !wants_running(&vm));
                if still_halted {
                    inner.write(Res::Vmi, &ns, &name, None);
                }
            });
        }
        _ => {}
    }
}

/// Pending → Scheduled → Running (with an IP, and one on its Multus network if it is on
/// one), then the guest starts listening.
pub(crate) async fn boot(
    inner: std::sync::Weak<Inner>,
    ns: String,
    name: String,
    uid: Value,
    port: u16,
    multus: Option<String>,
    options: Options,
) {
    let step = |phase: &str, ips: Option<(IpAddr, Option<IpAddr>)>| {
        let Some(inner) = inner.upgrade() else {
            return false;
        };
        let Some(mut vmi) = inner.get(Res::Vmi, &ns, &name) else {
            return false;
        };
        if vmi["metadata"]["uid"] != uid {
            return false;
        }
        vmi["status"]["phase"] = json!(phase);
        if let Some((ip, secondary)) = ips {
            let mut interfaces = vec![json!({"name": "default", "ipAddress": ip.to_string()})];
            if let (Some(name), Some(secondary)) = (&multus, secondary) {
                interfaces.push(json!({"name": name, "ipAddress": secondary.to_string()}));
            }
            vmi["status"]["interfaces"] = json!(interfaces);
        }
        inner.write(Res::Vmi, &ns, &name, Some(vmi));
        true
    };
    tokio::time::sleep(options.schedule_delay).await;
    if !step("Scheduled", None) {
        return;
    }
    tokio::time::sleep(options.running_delay).await;
    // The VMI's address is bound from now on (so no other server can answer for it), but
    // refuses connections until the guest application listens after `guest_delay`.
    let Some(socket) = reserve_socket(port) else {
        return;
    };
    // On a Multus network the guest answers there only (its pod-network address is
    // taken, so nothing answers on it).
    let secondary = match multus {
        Some(_) => match reserve_socket(port) {
            Some(socket) => Some(socket),
            None => return,
        },
        None => None,
    };
    let ip = socket.local_addr().expect("bound").ip();
    let secondary_ip = secondary.as_ref().map(|s| s.local_addr().expect("bound").ip());
    if !step("Running", Some((ip, secondary_ip))) {
        return;
    }
    let socket = secondary.unwrap_or(socket);
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let log = strong.guest_log(&ns, &name);
    let guest_delay = options.guest_delay;
    let style = options.guest;
    let mut held = strong.guests_held.subscribe();
    // Behind a proxy: the proxy takes the VMI's address (listening when the guest does),
    // the guest another one.
    let (front, socket) = match options.guest_behind_proxy {
        true => match reserve_socket(port) {
            Some(back) => (Some(socket), back),
            None => return,
        },
        false => (None, socket),
    };
    let (proxy_tx, proxy_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        tokio::time::sleep(guest_delay).await;
        let _ = held.wait_for(|held| !*held).await;
        let back = socket.local_addr().expect("bound");
        let guest = crate::guest::run(socket, log, style);
        if let Some(front) = front {
            let listener = front.listen(1024).expect("listen in front of the guest");
            let proxy = crate::fault_proxy::FaultProxy::on(listener, back);
            let _ = proxy_tx.send(Arc::new(proxy));
        }
        guest.await;
    });
    strong
        .guests
        .lock()
        .unwrap()
        .insert((ns.clone(), name.clone()), Guest { task, proxy: None });
    drop(strong);
    // The proxy (once the guest listens) goes where tests find it.
    if let Ok(proxy) = proxy_rx.await {
        if let Some(strong) = inner.upgrade() {
            if let Some(guest) = strong.guests.lock().unwrap().get_mut(&(ns, name)) {
                guest.proxy = Some(proxy);
            }
        }
    }
}
