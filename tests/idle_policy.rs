//! The adaptive idle policy through the real binary with the KubeVirt backend — on the
//! fake API server and on the real one of ../shared/k8s — with one-second bins, a
//! miniature of the real thing at one minute:
//!
//! - a VM fed one event every 6 s learns the period within five periods; from then on
//!   its events find it ready, while it is scaled down between them;
//! - a second replica that never saw the traffic pre-warms from the history the first
//!   wrote on the VM, and so does a replica started afresh (a restart);
//! - a malformed history annotation is a `BadAnnotation` warning and the fixed idle
//!   timeout, until the next scale-down writes a good one.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::binary::Activator;
use support::kube::Kube;
use tokio::time::Instant;
use vm_activator::idle_policy::History;

on_fake_and_real!(
    // A guest that takes 1.5 s to answer once its VM runs: a cold event waits for it.
    a_periodic_vm_is_learned_then_ready_for_each_event_and_down_between with Timings {
        guest: GUEST_BOOT,
        ..Timings::default()
    },
    a_malformed_history_is_a_warning_and_the_fixed_timeout,
);

const VM: &str = "tick";
const PERIOD: Duration = Duration::from_secs(6);
const GUEST_BOOT: Duration = Duration::from_millis(1500);
/// An event slower than this waited for (part of) a boot.
const COLD: Duration = Duration::from_millis(500);
/// One-second bins: every bound of the policy scaled down sixty times.
const SECONDS: &str = "idle:\n  adaptive:\n    bin: 1s\n    range: 2m\n    cold_start_cost: 50s\n";

fn adaptive_vm() -> Value {
    json!({
        "vm-activator.io/readiness": "http:/healthz",
        "vm-activator.io/idle-policy": "adaptive",
        "vm-activator.io/idle-timeout": "3s",
        "vm-activator.io/start-timeout": "30s",
    })
}

async fn scale_downs(activator: &Activator, ns: &str) -> f64 {
    activator
        .metric(&format!(
            "vm_activator_scale_downs_total{{action=\"stop\",namespace=\"{ns}\",vm=\"{VM}\"}}"
        ))
        .await
}

/// Sends one event at `at`; returns whether it found the VM ready (it was answered
/// without waiting for a boot).
async fn event_at(activator: &Activator, path: &str, id: &str, at: Instant) -> bool {
    tokio::time::sleep_until(at).await;
    let sent = Instant::now();
    assert_eq!(activator.send_status(path, id).await, 202, "{id}");
    let took = sent.elapsed();
    eprintln!("{id}: {took:?}");
    took < COLD
}

/// Waits until the VM is halted (scaled down after an event).
async fn until_halted(kube: &impl Kube) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while kube.vm(VM).await.unwrap()["spec"]["runStrategy"] != "Halted" {
        assert!(Instant::now() < deadline, "the VM was never scaled down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stored_history(kube: &impl Kube) -> History {
    let vm = kube.vm(VM).await.unwrap();
    let text = vm["metadata"]["annotations"]["vm-activator.io/idle-history"]
        .as_str()
        .unwrap_or_else(|| panic!("no idle history on the VM: {vm}"));
    History::parse(text).unwrap()
}

async fn a_periodic_vm_is_learned_then_ready_for_each_event_and_down_between(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let path = kube.path(VM);
    kube.create_opted_in_vm(VM, adaptive_vm()).await;
    // Replica `a` takes every event; replica `b` none, until `a` is gone.
    let mut a = kube.spawn_activator_with(SECONDS, &[]).await;
    let mut b = kube.spawn_activator_with(SECONDS, &[]).await;
    for replica in [&a, &b] {
        replica.wait_status("/readyz", 200, Duration::from_secs(20)).await;
        replica.wait_vm_state(&ns, VM, "stopped", Duration::from_secs(5)).await;
    }

    let mut at = Instant::now();
    let (mut warm, mut downs) = (Vec::new(), Vec::new());
    for i in 0..8 {
        warm.push(event_at(&a, &path, &format!("a-{i}"), at).await);
        downs.push(scale_downs(&a, &ns).await + scale_downs(&b, &ns).await);
        at += PERIOD;
    }
    eprintln!("warm: {warm:?}; scale-downs before each event: {downs:?}");
    // The first event, and three idle periods on the 3 s fallback: cold. Learned within
    // five periods: every later event finds the VM ready.
    assert!(warm[5..].iter().all(|w| *w), "learned within 5 periods: {warm:?}");
    // ...while it is scaled down between events.
    assert!(
        downs.windows(2).skip(4).all(|d| d[1] > d[0]),
        "scaled down between events: {downs:?}"
    );
    let prewarms_used = a
        .metric(&format!(
            "vm_activator_prewarm_total{{namespace=\"{ns}\",outcome=\"used\",vm=\"{VM}\"}}"
        ))
        .await;
    assert!(prewarms_used >= 3.0, "{prewarms_used}");
    let listed = a.vm(&ns, VM).await.unwrap();
    assert_eq!(listed["idle"]["policy"], "adaptive", "{listed}");
    assert_eq!(listed["idle"]["learned"], true, "{listed}");
    assert_eq!(listed["idle"]["keep_alive_ms"], 1000, "{listed}");

    // The history is on the VM, written with the scale-downs.
    until_halted(&kube).await;
    let history = stored_history(&kube).await;
    assert!(history.samples() >= 7, "{history}");

    // Replica `a` goes; `b`, which never saw an event, pre-warms for the next one.
    assert!(a.terminate(Duration::from_secs(20)).await.success());
    let b_warm = event_at(&b, &path, "b-0", at).await;
    at += PERIOD;
    assert!(
        b_warm,
        "a replica that never saw the traffic pre-warmed from the stored history"
    );

    // A fresh replica (a restart) pre-warms from the stored history too.
    until_halted(&kube).await;
    assert!(b.terminate(Duration::from_secs(20)).await.success());
    let c = kube.spawn_activator_with(SECONDS, &[]).await;
    c.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    let c_warm = event_at(&c, &path, "c-0", at).await;
    assert!(c_warm, "a restarted activator pre-warmed from the stored history");
    let started_ahead = c
        .metric(&format!(
            "vm_activator_prewarm_total{{namespace=\"{ns}\",outcome=\"used\",vm=\"{VM}\"}}"
        ))
        .await;
    assert_eq!(started_ahead, 1.0);
    let ids: Vec<String> = kube.guest_events(VM);
    assert_eq!(ids.len(), 10, "each event delivered once: {ids:?}");
}

async fn a_malformed_history_is_a_warning_and_the_fixed_timeout(kube: impl Kube) {
    let ns = kube.ns().to_string();
    let mut annotations = adaptive_vm();
    annotations["vm-activator.io/idle-history"] = json!("v1 bin=1s gaps=4:banana");
    kube.create_opted_in_vm(VM, annotations).await;
    let activator = kube.spawn_activator_with(SECONDS, &[]).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(20)).await;
    activator
        .wait_vm_state(&ns, VM, "stopped", Duration::from_secs(5))
        .await;
    let listed = activator.vm(&ns, VM).await.unwrap();
    let warnings = listed["warnings"].to_string();
    assert!(
        warnings.contains("idle-history") && warnings.contains("banana"),
        "{listed}"
    );
    assert_eq!(listed["idle"]["learned"], false, "{listed}");
    assert_eq!(
        listed["idle"]["keep_alive_ms"], 3000,
        "the fixed idle timeout: {listed}"
    );

    // An event: served, and the VM kept for its fixed idle timeout, not less.
    assert_eq!(activator.send_status(&kube.path(VM), "e-1").await, 202);
    let served = Instant::now();
    until_halted(&kube).await;
    let kept = served.elapsed();
    assert!(kept >= Duration::from_millis(2500), "scaled down after {kept:?}");

    // The Warning Event names the annotation; the scale-down wrote a good history.
    let events = kube.k8s_events().await;
    let bad = events
        .iter()
        .find(|e| e["reason"] == "BadAnnotation")
        .unwrap_or_else(|| panic!("no BadAnnotation Event: {events:#?}"));
    assert_eq!(bad["type"], "Warning");
    assert!(bad["note"].as_str().unwrap().contains("idle-history"), "{bad}");
    let repaired = stored_history(&kube).await;
    assert_eq!(repaired.bin(), Duration::from_secs(1));
    assert!(repaired.last_activity().is_some(), "{repaired}");
}
