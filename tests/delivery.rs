//! Held events reach a guest that cannot take them all at once, through the real binary
//! and the KubeVirt backend (fake and real API server): three replicas release their
//! held events together into a guest with a listen backlog of 1 that accepts slowly and
//! closes every connection (the kernel drops the SYNs it cannot queue), and a guest that
//! refuses connections for a while right after its probe passed. Connect failures are
//! retried within the event's budget and the per-endpoint limit adapts, so every event
//! is answered 2xx and delivered exactly once.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use fake_kube::guest::GuestStyle;
use futures_util::future::join_all;
use serde_json::json;
use support::binary::Activator;
use support::kube::Kube;

const VM: &str = "legacy";

on_fake_and_real!(
    three_replicas_release_300_held_events_into_a_guest_with_a_backlog_of_one with Timings {
        style: GuestStyle {
            backlog: 1,
            accept_every: Duration::from_millis(3),
            close_each: true,
            ..GuestStyle::default()
        },
        ..Timings::default()
    },
    a_guest_refusing_connections_right_after_its_probe_passed_gets_every_event with Timings {
        style: GuestStyle {
            refuse_after_ready: Duration::from_millis(500),
            ..GuestStyle::default()
        },
        ..Timings::default()
    },
);

async fn activators(kube: &impl Kube, count: usize) -> Vec<Activator> {
    kube.create_opted_in_vm(
        VM,
        json!({
            "vm-activator.io/readiness": "http:/healthz",
            "vm-activator.io/idle-timeout": "1m",
            "vm-activator.io/start-timeout": "60s",
        }),
    )
    .await;
    let ns = kube.ns().to_string();
    let activators = join_all((0..count).map(|_| kube.spawn_activator(&[]))).await;
    for a in &activators {
        a.wait_status("/readyz", 200, Duration::from_secs(20)).await;
        a.wait_vm_state(&ns, VM, "stopped", Duration::from_secs(5)).await;
    }
    activators
}

/// Sends `count` events spread over `activators` at once and checks each was answered
/// 2xx and is in the guest's log exactly once.
async fn every_event_delivered_once(kube: &impl Kube, activators: &[Activator], count: usize) {
    let path = kube.path(VM);
    let ids: Vec<String> = (0..count).map(|i| format!("e-{i}")).collect();
    let sends = ids
        .iter()
        .enumerate()
        .map(|(i, id)| activators[i % activators.len()].send_status(&path, id));
    let codes = join_all(sends).await;
    let failed: Vec<_> = codes.iter().filter(|c| !(200..300).contains(*c)).collect();
    assert!(failed.is_empty(), "{} of {count} not 2xx: {failed:?}", failed.len());
    let delivered = kube.guest_events(VM);
    assert_eq!(delivered.len(), count, "each exactly once");
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    assert_eq!(kube.vmi_creations(VM), 1, "one start");
}

async fn three_replicas_release_300_held_events_into_a_guest_with_a_backlog_of_one(kube: impl Kube) {
    let activators = activators(&kube, 3).await;
    every_event_delivered_once(&kube, &activators, 300).await;
    let mut retries = 0.0;
    for a in &activators {
        let series = format!(
            "vm_activator_guest_connect_retries_total{{namespace=\"{}\",vm=\"{VM}\"}}",
            kube.ns()
        );
        retries += a.metric(&series).await;
    }
    eprintln!("connect retries over the three replicas: {retries}");
}

async fn a_guest_refusing_connections_right_after_its_probe_passed_gets_every_event(kube: impl Kube) {
    let activators = activators(&kube, 1).await;
    every_event_delivered_once(&kube, &activators, 50).await;
}
