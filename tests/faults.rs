//! Faults on the paths the activator depends on, injected by a TCP proxy
//! (`support::fault_proxy`) through the real binary: a half-open path to the real API
//! server of ../shared/k8s (no error, no bytes), and guests that stall, trickle or answer
//! without end.

mod support;

use std::time::Duration;

use fake_kube::guest::{GuestFault, GuestStyle};
use fake_kube::{FakeKube, Options};
use support::binary::Activator;
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

/// What the sender sees of one event to a misbehaving guest.
#[derive(Debug, PartialEq)]
enum Seen {
    /// An error the activator made: its status and JSON `error` code.
    Refused(u16, String),
    /// The guest's status, and a body that ended early (the response was cut off).
    CutOff(u16),
}

/// One event to VM `apps/svc`; how it ended, and how long it took.
async fn send_one(client: &reqwest::Client, activator: &Activator, id: &str) -> (Seen, Duration) {
    let sent = Instant::now();
    let response = client
        .post(format!("{}/apps/svc", activator.ingress))
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "faults")
        .header("ce-type", "test")
        .body("{}")
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let seen = if status >= 500 {
        let body: serde_json::Value = response.json().await.expect("a JSON error");
        Seen::Refused(status, body["error"].as_str().unwrap_or_default().to_string())
    } else {
        let read = response.bytes().await;
        assert!(read.is_err(), "a body that should have been cut off ended: {read:?}");
        Seen::CutOff(status)
    };
    (seen, sent.elapsed())
}

fn rss_kib(activator: &Activator) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", activator.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Guests whose probes pass but whose answers to events never come as they should:
/// each event, held through the cold start or warm, ends within the VM's
/// `request_timeout` (2 s here) with the sender told, and the activator's memory stays
/// flat. Before the bounds a trickling or endless body held its request (and the
/// sender) for as long as the guest kept sending, and an endless one was passed on
/// without limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalling_trickling_and_endless_guests_end_within_their_budget() {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let table = [
        (GuestFault::Stall, Seen::Refused(504, "guest_timeout".into())),
        (GuestFault::Trickle(Duration::from_millis(200)), Seen::CutOff(200)),
        (
            GuestFault::Oversize(Some(1 << 30)),
            Seen::Refused(502, "guest_response_too_large".into()),
        ),
        (GuestFault::Oversize(None), Seen::CutOff(200)),
    ];
    for (fault, expected) in table {
        let options = Options {
            guest: GuestStyle {
                fault,
                ..GuestStyle::default()
            },
            ..Options::default()
        };
        let kube = FakeKube::start(options).await;
        let mut vm = annotations("10m");
        vm["vm-activator.io/request-timeout"] = "2s".into();
        kube.create_opted_in_vm("apps", "svc", vm);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = kube.write_kubeconfig(dir.path());
        let config = dir.path().join("config.yaml");
        let text = format!(
            "backend: kubevirt\nkubevirt:\n  kubeconfig: {}\nproxy:\n  max_response_body_bytes: 1048576\n",
            kubeconfig.display()
        );
        std::fs::write(&config, text).unwrap();
        let activator = Activator::spawn(&["--config", config.to_str().unwrap(), "--auth", "none"]).await;
        activator.wait_status("/readyz", 200, Duration::from_secs(10)).await;

        // Held through the cold start, then warm, then several at once.
        let (held, took) = send_one(&client, &activator, "held").await;
        assert_eq!(held, expected, "{fault:?}, held");
        assert!(took < Duration::from_secs(15), "{fault:?}: held event took {took:?}");
        let before = rss_kib(&activator);
        let (warm, took) = send_one(&client, &activator, "warm").await;
        assert_eq!(warm, expected, "{fault:?}, warm");
        assert!(took < Duration::from_secs(10), "{fault:?}: warm event took {took:?}");
        let many = futures_util::future::join_all((0..16).map(|i| {
            let (client, activator) = (&client, &activator);
            async move { send_one(client, activator, &format!("many-{i}")).await.0 }
        }))
        .await;
        assert!(many.iter().all(|seen| *seen == expected), "{fault:?}: {many:?}");
        let grown = rss_kib(&activator).saturating_sub(before);
        eprintln!("{fault:?}: held {held:?}, warm {warm:?} in {took:?}; RSS grew {grown} KiB over 17 events");
        // 16 at once, each passing at most 1 MiB on: nothing of it may stay.
        assert!(grown < 16 * 1024, "{fault:?}: RSS grew {grown} KiB");
        assert_eq!(
            activator.get_status("/readyz").await,
            200,
            "{fault:?}: the activator still serves"
        );
    }
}
