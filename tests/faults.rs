//! Faults on the paths the activator depends on, injected by a TCP proxy
//! (`support::fault_proxy`) through the real binary: a half-open path to the real API
//! server of ../shared/k8s (no error, no bytes), and guests that stall, trickle or answer
//! without end.

mod support;

use std::time::Duration;

use support::fault_proxy::{Fault, FaultProxy};
use support::kube::{annotations, Kube};
use support::real_kube::{RealKube, Timings};
use tokio::time::Instant;

/// The watch timeout the half-open scenario runs with: the bound on noticing is this +
/// 4 s (`kubevirt::api_read_timeout`), 59 s with the default of 55 s.
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The path to the API server stops moving bytes in both directions, on every open
/// connection and every new one, without closing anything. Before the fix the watches
/// were quietly re-opened over the dead path by kube-runtime's watcher and `/readyz`
/// never failed: events for stopped VMs waited out their start timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_api_path_fails_readyz_within_its_bound_and_heals_by_itself() {
    let Some(kube) = RealKube::start(Timings::default()).await else {
        return;
    };
    let server = support::real_kube::env().unwrap().server.clone();
    let target = server.trim_start_matches("https://").parse().expect("host:port");
    let proxy = FaultProxy::start(target).await;
    for vm in ["warm", "cold"] {
        kube.create_opted_in_vm(vm, annotations("10m")).await;
    }
    let activator = kube
        .spawn_activator_via(
            Some(&format!("https://{}", proxy.addr())),
            &format!("  watch_timeout: {}s\n", WATCH_TIMEOUT.as_secs()),
            "",
            &[],
        )
        .await;
    activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    let ns = kube.namespace().to_string();
    assert_eq!(activator.send_status(&format!("/{ns}/warm"), "before").await, 202);
    activator
        .wait_vm_state(&ns, "warm", "ready", Duration::from_secs(10))
        .await;

    proxy.set(Fault::BlackHole(None));
    let cut_at = Instant::now();
    // Ready VMs are served throughout (their guests are reached directly).
    let mut served = 0;
    let noticed = loop {
        assert!(
            cut_at.elapsed() < WATCH_TIMEOUT + Duration::from_secs(4) + Duration::from_secs(15),
            "/readyz still 200 {:?} after the API path went silent",
            cut_at.elapsed()
        );
        let id = format!("during-{served}");
        assert_eq!(activator.send_status(&format!("/{ns}/warm"), &id).await, 202, "{id}");
        served += 1;
        if activator.get_status("/readyz").await == 503 {
            break cut_at.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("half-open API path noticed after {noticed:?} (bound: watch_timeout {WATCH_TIMEOUT:?} + 4 s)");

    // A VM that is not Ready is refused at once, with a hint when to come back.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        activator.send(&format!("/{ns}/cold"), "refused"),
    )
    .await
    .expect("refused at once, not held");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "backend_unavailable", "{body}");
    assert_eq!(activator.send_status(&format!("/{ns}/warm"), "still-served").await, 202);

    // The path heals: the activator recovers by itself, with nothing lost.
    proxy.set(Fault::None);
    let healed = Instant::now();
    activator.wait_status("/readyz", 200, Duration::from_secs(30)).await;
    eprintln!("ready again {:?} after the path healed", healed.elapsed());
    assert_eq!(activator.send_status(&format!("/{ns}/cold"), "after").await, 202);
    assert_eq!(kube.guest_events("cold"), vec!["after"]);
    let warm = kube.guest_events("warm");
    assert_eq!(
        warm.len(),
        served + 2,
        "every event for the warm VM delivered once: {warm:?}"
    );
}
