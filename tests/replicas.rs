//! Three activator processes against one cluster — the fake kube-apiserver, and the real
//! one where ../shared/k8s is present — as a Deployment with three replicas behind one
//! Service: shared idleness through the `vm-activator.io/last-activity` annotation,
//! compare-and-stop, no leader, and a drain that loses nothing.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;
use support::binary::Activator;
use support::kube::Kube;
use tokio::time::Instant;

const VM: &str = "shared";

on_fake_and_real!(
    a_vm_fed_by_any_replica_is_never_stopped_and_exactly_one_replica_stops_it_after,
    a_burst_at_all_three_replicas_during_a_cold_start_starts_the_vm_once,
    // A slow guest, so the burst is held during the cold start when SIGTERM arrives.
    sigterm_to_one_replica_mid_burst_loses_no_acknowledged_event with Timings {
        guest: Duration::from_millis(800),
        ..Timings::default()
    },
    held_events_past_the_drain_deadline_get_503_not_silence with Timings {
        guest: Duration::from_secs(60),
        ..Timings::default()
    },
);

struct Replicas<K> {
    kube: K,
    ns: String,
    replicas: Vec<Activator>,
}

async fn replicas<K: Kube>(kube: K, idle_timeout: &str, extra: &[&str]) -> Replicas<K> {
    kube.create_opted_in_vm(
        VM,
        json!({
            "vm-activator.io/readiness": "http:/healthz",
            "vm-activator.io/idle-timeout": idle_timeout,
            "vm-activator.io/start-timeout": "30s",
        }),
    )
    .await;
    let ns = kube.ns().to_string();
    let replicas = join_all((0..3).map(|_| kube.spawn_activator(extra))).await;
    for r in &replicas {
        r.wait_status("/readyz", 200, Duration::from_secs(20)).await;
        r.wait_vm_state(&ns, VM, "stopped", Duration::from_secs(5)).await;
    }
    Replicas { kube, ns, replicas }
}

impl<K: Kube> Replicas<K> {
    fn applied_stops(&self) -> usize {
        self.kube.count(|r| r.is_applied_stop(&self.ns, VM))
    }
    fn activity_writes(&self) -> usize {
        self.kube.count(|r| r.is_activity_write(&self.ns, VM))
    }
    fn path(&self) -> String {
        self.kube.path(VM)
    }
}

async fn a_vm_fed_by_any_replica_is_never_stopped_and_exactly_one_replica_stops_it_after(kube: impl Kube) {
    let c = replicas(kube, "2s", &[]).await;
    let path = c.path();

    // Round-robin across the three, then only replica 0 for longer than the idle
    // timeout: replicas 1 and 2 see nothing, yet must not stop the VM.
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let target = if started.elapsed() < Duration::from_secs(2) {
            sent % 3
        } else {
            0
        };
        assert_eq!(c.replicas[target].send_status(&path, &format!("e-{sent}")).await, 202);
        sent += 1;
        assert_eq!(c.applied_stops(), 0, "stopped while replica {target} was feeding it");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(c.kube.vmi_creations(VM), 1, "never stopped, so started once");
    let writes = c.activity_writes();
    eprintln!(
        "activity annotation writes under steady traffic: {writes} in {:?} with idle-timeout 2s ({:.2}/s)",
        started.elapsed(),
        writes as f64 / started.elapsed().as_secs_f64()
    );
    // At most one per idle_timeout / 10 (200 ms) per VM for all replicas together,
    // give or take replicas racing within one interval.
    let bound = (started.elapsed().as_millis() / 200) as usize + 3;
    assert!(
        writes <= bound,
        "{writes} annotation writes in {:?}, bound {bound}",
        started.elapsed()
    );

    // All traffic stops: exactly one replica's stop lands.
    c.kube
        .expect_request("a stop", Duration::from_secs(10), |r| r.is_applied_stop(&c.ns, VM))
        .await;
    for r in &c.replicas {
        r.wait_vm_state(&c.ns, VM, "stopped", Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.applied_stops(), 1, "exactly one stop patch took effect");
    let delivered = c.kube.guest_events(VM);
    assert_eq!(delivered.len(), sent, "every event delivered once");
}

async fn a_burst_at_all_three_replicas_during_a_cold_start_starts_the_vm_once(kube: impl Kube) {
    let c = replicas(kube, "1m", &[]).await;
    let path = c.path();
    let ids: Vec<String> = (0..60).map(|i| format!("b-{i}")).collect();
    let sends = ids
        .iter()
        .enumerate()
        .map(|(i, id)| c.replicas[i % 3].send_status(&path, id));
    let codes = join_all(sends).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    assert_eq!(c.kube.vmi_creations(VM), 1, "one start");
    let delivered = c.kube.guest_events(VM);
    assert_eq!(delivered.len(), 60, "each exactly once");
    assert_eq!(
        delivered.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
}

async fn sigterm_to_one_replica_mid_burst_loses_no_acknowledged_event(kube: impl Kube) {
    let mut c = replicas(kube, "1m", &[]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let urls: Vec<String> = c
        .replicas
        .iter()
        .map(|r| format!("{}{}", r.ingress, c.path()))
        .collect();
    let send = |i: usize| {
        let (client, url) = (client.clone(), urls[i % 3].clone());
        async move {
            let id = format!("t-{i}");
            let status = client
                .post(url)
                .header("ce-specversion", "1.0")
                .header("ce-id", &id)
                .header("ce-source", "/t")
                .header("ce-type", "t")
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (id, status)
        }
    };
    let first = tokio::spawn(join_all((0..60).map(send)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let terminating = c.replicas.remove(1);
    let mut terminating = terminating;
    let stop = tokio::spawn(async move {
        let status = terminating.terminate(Duration::from_secs(30)).await;
        (terminating, status)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = join_all((60..120).map(send)).await;
    let mut results = first.await.unwrap();
    results.extend(second);
    let (_terminated, exit) = stop.await.unwrap();
    assert!(exit.success(), "the draining replica exits 0: {exit}");

    let delivered: HashSet<String> = c.kube.guest_events(VM).into_iter().collect();
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for (id, status) in &results {
        *by_status.entry(*status).or_default() += 1;
        if (200..300).contains(status) {
            assert!(delivered.contains(id), "{id} was acknowledged but never delivered");
        } else {
            // 503 from the draining replica, or a refused connection once it is gone:
            // both are retried by Knative. Never a 2xx for an undelivered event.
            assert!(*status == 503 || *status == 0, "{id} got {status}");
        }
    }
    eprintln!("statuses during SIGTERM mid-burst: {by_status:?}");
    assert!(
        by_status.get(&202).copied().unwrap_or(0) >= 80,
        "most events went through: {by_status:?}"
    );
}

async fn held_events_past_the_drain_deadline_get_503_not_silence(kube: impl Kube) {
    let mut c = replicas(kube, "1m", &["--drain-timeout", "1s"]).await;
    let url = format!("{}{}", c.replicas[0].ingress, c.path());
    let held = tokio::spawn(async move { support::post_event(&reqwest::Client::new(), &url, "stuck").await });
    c.replicas[0]
        .wait_vm_state(&c.ns, VM, "probing", Duration::from_secs(5))
        .await;
    let started = Instant::now();
    let exit = c.replicas[0].terminate(Duration::from_secs(10)).await;
    assert!(exit.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the drain timeout"
    );
    assert_eq!(held.await.unwrap(), 503);
    assert!(c.kube.guest_events(VM).is_empty());
}
