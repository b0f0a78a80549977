//! The project's chaos test, through the real binary and the fake API server: three
//! activator replicas in front of three VMs while guests crash, one replica is
//! SIGKILLed and another SIGTERMed (each restarted), and the API server goes down and
//! comes back — with events flowing all the while, each sent once to a live replica
//! (as a Service would route; the sender does not retry, so every duplicate in the
//! guests' logs would be the activator's).
//!
//! Prints: events acknowledged (2xx) but not delivered (must be 0), duplicates (must be
//! 0), the share answered 2xx (target ≥ 97 %), and every other answer with its reason.
//! `CHAOS_EVENTS` sets the number of events: 1,000 by default (CI), 10,000 for the long
//! run.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_kube::{FakeKube, Options};
use serde_json::json;
use support::binary::Activator;
use support::kube::NS;
use tokio::time::Instant;

const VMS: [&str; 3] = ["chaos-0", "chaos-1", "chaos-2"];
const SENDERS: usize = 24;
/// Events per second, over all senders (1,000 events take 10 s, 10,000 take 100 s).
const RATE: f64 = 100.0;
/// A guest crashes this often (the three VMs in turn).
const CRASH_EVERY: Duration = Duration::from_secs(4);

/// What one event got: its id, and the status and error code of the answer (0 and
/// "no_answer" when the connection failed).
struct Outcome {
    id: String,
    status: u16,
    error: String,
}

/// The replicas' ingress URLs a sender may use now (`None` while one is down).
type Live = Arc<Mutex<Vec<Option<String>>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let events: usize = std::env::var("CHAOS_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let kube = Arc::new(FakeKube::start(Options::default()).await);
    for vm in VMS {
        kube.create_opted_in_vm(
            NS,
            vm,
            json!({
                "vm-activator.io/readiness": "http:/healthz",
                "vm-activator.io/idle-timeout": "10m",
                "vm-activator.io/start-timeout": "30s",
            }),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ready_replica(&kubeconfig).await);
    }
    let live: Live = Arc::new(Mutex::new(replicas.iter().map(|r| Some(r.ingress.clone())).collect()));

    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(events)));
    let started = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            tokio::spawn(send_events(
                events,
                started,
                next.clone(),
                live.clone(),
                outcomes.clone(),
            ))
        })
        .collect();

    // The chaos: a guest crash every 4 s (the three VMs in turn); a replica SIGKILLed
    // at 25 % of the events and another SIGTERMed at 50 % (each restarted at once); the
    // API server down for 2 s at 75 %.
    let progress = || next.load(Ordering::Relaxed) * 100 / events;
    let mut crashes = 0;
    let mut next_crash = started + CRASH_EVERY;
    let mut step = 0;
    while next.load(Ordering::Relaxed) < events {
        let percent = progress();
        if Instant::now() >= next_crash {
            crashes += 1;
            next_crash += CRASH_EVERY;
            kube.crash_vm(NS, VMS[crashes % VMS.len()]);
        }
        if step == 0 && percent >= 25 {
            step = 1;
            eprintln!("chaos: SIGKILL replica 0");
            live.lock().unwrap()[0] = None;
            replicas[0].child.kill().unwrap();
            replicas[0] = ready_replica(&kubeconfig).await;
            live.lock().unwrap()[0] = Some(replicas[0].ingress.clone());
        } else if step == 1 && percent >= 50 {
            step = 2;
            eprintln!("chaos: SIGTERM replica 1");
            // Its /readyz fails at once: a Service stops routing to it.
            live.lock().unwrap()[1] = None;
            let status = replicas[1].terminate(Duration::from_secs(60)).await;
            assert!(status.success(), "a drained replica exits 0: {status}");
            replicas[1] = ready_replica(&kubeconfig).await;
            live.lock().unwrap()[1] = Some(replicas[1].ingress.clone());
        } else if step == 2 && percent >= 75 {
            step = 3;
            eprintln!("chaos: API server down for 2 s");
            kube.set_down(true).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            kube.set_down(false).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let elapsed = started.elapsed();

    let outcomes = outcomes.lock().unwrap();
    assert_eq!(outcomes.len(), events);
    let mut delivered: HashMap<String, usize> = HashMap::new();
    for vm in VMS {
        for id in kube.guest_events(NS, vm) {
            *delivered.entry(id).or_default() += 1;
        }
    }
    let acknowledged: Vec<&Outcome> = outcomes.iter().filter(|o| (200..300).contains(&o.status)).collect();
    let lost: Vec<&str> = acknowledged
        .iter()
        .filter(|o| !delivered.contains_key(&o.id))
        .map(|o| o.id.as_str())
        .collect();
    let duplicated: Vec<(&String, &usize)> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    let mut others: BTreeMap<(u16, &str), usize> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !(200..300).contains(&o.status)) {
        *others.entry((o.status, o.error.as_str())).or_default() += 1;
    }
    let share = acknowledged.len() as f64 * 100.0 / events as f64;
    eprintln!(
        "chaos: {events} events in {:.1} s, {crashes} guest crashes, 1 SIGKILL, 1 SIGTERM, 1 API outage",
        elapsed.as_secs_f64()
    );
    eprintln!("chaos: acknowledged but not delivered: {}", lost.len());
    eprintln!("chaos: duplicates created by the activator: {}", duplicated.len());
    eprintln!("chaos: answered 2xx: {} of {events} ({share:.2} %)", acknowledged.len());
    for ((status, error), count) in &others {
        eprintln!("chaos: {count} × {status} {error}");
    }
    assert!(lost.is_empty(), "acknowledged but never delivered: {lost:?}");
    assert!(duplicated.is_empty(), "delivered more than once: {duplicated:?}");
    assert!(share >= 97.0, "only {share:.2} % answered 2xx: {others:?}");
}

/// A new replica, once it is ready.
async fn ready_replica(kubeconfig: &std::path::Path) -> Activator {
    let replica = Activator::spawn_kubevirt(kubeconfig, &[]).await;
    replica.wait_status("/readyz", 200, Duration::from_secs(30)).await;
    replica
}

/// Sends events until `total` were taken, event `i` at `started + i / RATE`, each to
/// the next live replica.
async fn send_events(
    total: usize,
    started: Instant,
    next: Arc<AtomicUsize>,
    live: Live,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return;
        }
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / RATE)).await;
        let url = loop {
            let urls: Vec<String> = live.lock().unwrap().iter().flatten().cloned().collect();
            if !urls.is_empty() {
                break urls[i % urls.len()].clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let id = format!("x-{i}");
        let vm = VMS[i % VMS.len()];
        let answer = client
            .post(format!("{url}/{NS}/{vm}"))
            .header("ce-specversion", "1.0")
            .header("ce-id", &id)
            .header("ce-source", "/chaos")
            .header("ce-type", "chaos")
            .send()
            .await;
        let (status, error) = match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let error = match (200..300).contains(&status) {
                    true => String::new(),
                    false => response
                        .json::<serde_json::Value>()
                        .await
                        .ok()
                        .and_then(|body| body["error"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "unknown".into()),
                };
                (status, error)
            }
            Err(_) => (0, "no_answer".to_string()),
        };
        outcomes.lock().unwrap().push(Outcome { id, status, error });
    }
}
