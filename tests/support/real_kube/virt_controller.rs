//! The test's virt-controller against the real API server: a VM asked to run gets a VMI
//! that goes Scheduled → Running with an address (and one on its Multus network, if its
//! template has one) where fake-kube's guest application listens a little later; a VM
//! halted or deleted loses its VMI and guest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fake_kube::guest::{self, GuestLog};
use fake_kube::multus_interface;
use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use super::Timings;

pub(super) fn vm_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
        "virtualmachines",
    )
}

pub(super) fn vmi_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachineInstance"),
        "virtualmachineinstances",
    )
}

/// Whether a VirtualMachine asks to run (as virt-controller reads it).
fn wants_running(vm: &Value) -> bool {
    match vm["spec"]["runStrategy"].as_str() {
        Some("Always" | "RerunOnFailure" | "Once") => true,
        Some(_) => false,
        None => vm["spec"]["running"].as_bool() == Some(true),
    }
}

/// Plays virt-controller in `namespace` until aborted.
pub(super) async fn virt_controller(
    client: kube::Client,
    namespace: String,
    logs: Arc<Mutex<HashMap<String, GuestLog>>>,
    boot_counts: Arc<Mutex<HashMap<String, usize>>>,
    timings: Timings,
) {
    let vms: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &vm_resource());
    let vmis: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &vmi_resource());
    let mut boots: HashMap<String, JoinHandle<()>> = HashMap::new();
    // With a backoff: a watch that fails at once (the namespace deleted as the test
    // ends) would otherwise be retried in a loop that never yields, and the test's
    // runtime could never shut down (a soak run hung there, 10 min at full CPU).
    let mut events = watcher(vms, watcher::Config::default()).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let (vm, deleted) = match event {
            Ok(watcher::Event::Apply(vm) | watcher::Event::InitApply(vm)) => (vm, false),
            Ok(watcher::Event::Delete(vm)) => (vm, true),
            _ => continue,
        };
        let name = vm.metadata.name.clone().unwrap_or_default();
        let run = !deleted && wants_running(&serde_json::to_value(&vm).unwrap());
        let booted = boots.contains_key(&name);
        if run && !booted {
            *boot_counts.lock().unwrap().entry(name.clone()).or_default() += 1;
            let log = logs.lock().unwrap().entry(name.clone()).or_default().clone();
            let multus = multus_interface(&serde_json::to_value(&vm).unwrap());
            boots.insert(
                name.clone(),
                tokio::spawn(boot(vmis.clone(), name, multus, log, timings)),
            );
        } else if !run && booted {
            if let Some(task) = boots.remove(&name) {
                task.abort();
            }
            let _ = vmis.delete(&name, &DeleteParams::default()).await;
        }
    }
}

/// One VMI's life: created, Scheduled, Running with an address (and one on the Multus
/// interface `multus`, where alone the guest then listens), then the guest listens.
/// Aborting the task ends the guest.
async fn boot(vmis: Api<DynamicObject>, name: String, multus: Option<String>, log: GuestLog, timings: Timings) {
    let vmi: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name},
        "spec": {"domain": {"devices": {}}},
    }))
    .unwrap();
    if vmis.create(&PostParams::default(), &vmi).await.is_err() {
        return;
    }
    let status = |status: Value| {
        let vmis = vmis.clone();
        let name = name.clone();
        async move {
            vmis.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
            .is_ok()
        }
    };
    tokio::time::sleep(timings.schedule).await;
    if !status(json!({"phase": "Scheduled"})).await {
        return;
    }
    tokio::time::sleep(timings.running).await;
    let socket = guest::reserve_socket(8080).expect("a guest address");
    let ip = socket.local_addr().expect("bound").ip();
    let mut interfaces = vec![json!({"name": "default", "ipAddress": ip.to_string()})];
    let secondary = multus.map(|name| {
        let socket = guest::reserve_socket(8080).expect("a guest address");
        let ip = socket.local_addr().expect("bound").ip();
        interfaces.push(json!({"name": name, "ipAddress": ip.to_string()}));
        socket
    });
    if !status(json!({"phase": "Running", "interfaces": interfaces})).await {
        return;
    }
    let socket = secondary.unwrap_or(socket);
    tokio::time::sleep(timings.guest).await;
    guest::run(socket, log, timings.style).await;
}
