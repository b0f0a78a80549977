//! Faults on the paths the activator depends on, through the real binary: a half-open
//! path to the real API server of ../shared/k8s (no error, no bytes) and a broken path to
//! a guest, both made by a fault-injecting TCP proxy (`fake_kube::fault_proxy`); guests
//! that stall, trickle or answer without end; and a flood beyond every bound.

mod support;

use std::time::Duration;

use fake_kube::fault_proxy::{Direction, Fault, FaultProxy};
use fake_kube::guest::{GuestFault, GuestStyle};
use fake_kube::{FakeKube, Options};
use support::binary::Activator;
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
    rss_kib_of(activator.child.id())
}

fn rss_kib_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
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
        let (_dir, activator) =
            support::kube::spawn_with_config(&kube, "", "proxy:\n  max_response_body_bytes: 1048576\n").await;
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

/// One raw HTTP/1.1 request on its own connection: the whole event, or (`slow_body`)
/// the head and 10 of the 1,000 bytes it announces, then nothing. At most as many
/// senders as `connecting` has permits open their connection at once: the flood is of
/// open connections, not of simultaneous SYNs (a burst of those beyond the listen backlog
/// is dropped by the kernel and retried by the senders seconds later, on a slow machine
/// past the test's patience). The status line's code, whether a `Retry-After` came, and
/// the error code of the answer's JSON body (empty if none); the connection is closed after.
async fn raw_event(
    ingress: &str,
    path: &str,
    id: &str,
    slow_body: bool,
    connecting: &tokio::sync::Semaphore,
) -> (u16, bool, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = ingress.trim_start_matches("http://");
    let (length, body) = if slow_body { (1000, "{\"partial\"") } else { (2, "{}") };
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nce-specversion: 1.0\r\nce-id: {id}\r\nce-source: flood\r\n\
         ce-type: test\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n{body}"
    );
    let mut stream = {
        let _permit = connecting.acquire().await.expect("never closed");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        stream
    };
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let complete = |answer: &[u8]| {
        let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(0);
        answer.len() >= end + 4 + length
    };
    while !complete(&answer) {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let code = text
        .split_once("\"error\":\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(code, _)| code.to_string())
        .unwrap_or_default();
    (status, text.contains("\r\nretry-after:"), code)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Sequential events to the warm VM: their latencies, sorted.
async fn warm_latencies(client: &reqwest::Client, activator: &Activator, n: usize, tag: &str) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let sent = Instant::now();
        let status = client
            .post(format!("{}/apps/warm", activator.ingress))
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("{tag}-{i}"))
            .header("ce-source", "flood")
            .header("ce-type", "test")
            .body("{}")
            .send()
            .await
            .expect("warm answer")
            .status();
        assert_eq!(status, 202, "the warm VM is served during the flood");
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    latencies
}

/// Far more events than `max_buffered` for stopped VMs whose guests do not come up,
/// each on its own connection, plus senders that never finish their body: exactly
/// `max_buffered` per VM are held, every other one is answered 503 + Retry-After at
/// once, the slow bodies get 408 after `ingress.body_read_timeout`, the activator's
/// memory stays under the bound its config implies, and a warm VM keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_bounds_is_refused_at_once_and_memory_stays_bounded() {
    const VMS: usize = 4;
    const PER_VM: usize = 1000;
    const MAX_BUFFERED: usize = 500;
    const SLOW_BODIES: usize = 200;
    let kube = FakeKube::start(Options::default()).await;
    kube.create_opted_in_vm("apps", "warm", annotations("10m"));
    for v in 0..VMS {
        let mut vm = annotations("10m");
        vm["vm-activator.io/max-buffered"] = MAX_BUFFERED.to_string().into();
        // Longer than the test: what is held stays held until the guests come up, however
        // slow the machine (a start timeout would answer held events 503 and pass them off
        // as overflow).
        vm["vm-activator.io/start-timeout"] = "30m".into();
        kube.create_opted_in_vm("apps", &format!("cold-{v}"), vm);
    }
    let (_dir, activator) = support::kube::spawn_with_config(&kube, "", "ingress:\n  body_read_timeout: 5s\n").await;
    activator.wait_status("/readyz", 200, Duration::from_secs(10)).await;
    let client = reqwest::Client::new();
    warm_latencies(&client, &activator, 50, "warm-up").await;
    let quiet = warm_latencies(&client, &activator, 200, "quiet").await;
    // From now on no guest comes up: what is held stays held.
    kube.hold_guests(true);
    let idle_rss = rss_kib(&activator);

    let ingress = activator.ingress.clone();
    let connecting = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let flood_started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for v in 0..VMS {
        for i in 0..PER_VM {
            let (ingress, connecting) = (ingress.clone(), connecting.clone());
            senders.spawn(async move {
                let answer = raw_event(
                    &ingress,
                    &format!("/apps/cold-{v}"),
                    &format!("{v}-{i}"),
                    false,
                    &connecting,
                )
                .await;
                (false, answer, Instant::now())
            });
        }
    }
    for i in 0..SLOW_BODIES {
        let (ingress, connecting) = (ingress.clone(), connecting.clone());
        senders.spawn(async move {
            let answer = raw_event(
                &ingress,
                &format!("/apps/cold-{}", i % VMS),
                &format!("slow-{i}"),
                true,
                &connecting,
            )
            .await;
            (true, answer, Instant::now())
        });
    }
    // The highest RSS while the flood lasts.
    let pid = activator.child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_kib_of(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    // The overflow is refused at once, the slow bodies get 408 once their time is up;
    // the held events wait (any answer to one of them fails the test).
    let (mut refused, mut refused_by, mut timed_out) = (0, Duration::ZERO, 0);
    let mut during = Vec::new();
    while refused < VMS * (PER_VM - MAX_BUFFERED) || timed_out < SLOW_BODIES {
        if during.is_empty() && refused == VMS * (PER_VM - MAX_BUFFERED) {
            during = warm_latencies(&client, &activator, 200, "flood").await;
        }
        let (slow, (status, retry_after, code), at) =
            tokio::time::timeout(Duration::from_secs(30), senders.join_next())
                .await
                .expect("the overflow and the slow bodies are answered")
                .expect("a sender")
                .unwrap();
        if slow {
            assert_eq!((status, code.as_str()), (408, "body_timeout"), "a body that never came");
            timed_out += 1;
        } else {
            assert_eq!(
                (status, retry_after, code.as_str()),
                (503, true, "buffer_full"),
                "overflow: 503 + Retry-After"
            );
            refused += 1;
            refused_by = at - flood_started;
        }
    }
    if during.is_empty() {
        during = warm_latencies(&client, &activator, 200, "flood").await;
    }
    let mut buffered = 0.0;
    for v in 0..VMS {
        let series = format!("vm_activator_buffered_requests{{namespace=\"apps\",vm=\"cold-{v}\"}}");
        buffered += activator.metric(&series).await;
    }
    sampler.abort();
    let peak_rss = peak.load(std::sync::atomic::Ordering::Relaxed).max(rss_kib(&activator));
    assert_eq!(senders.len(), VMS * MAX_BUFFERED, "exactly max_buffered held per VM");
    let grown = peak_rss.saturating_sub(idle_rss);
    // The bound the config implies (docs/configuration.md, "Memory under a flood"): per held event its body and at most
    // 16 KiB (its request, connection and place in the queue), per other open connection
    // 8 KiB, plus 8 MiB for the runtime and allocator.
    let held = VMS * MAX_BUFFERED;
    let bound_kib = (held * 16 + SLOW_BODIES * 8 + 8 * 1024) as u64;
    eprintln!(
        "flood: {} senders, {refused} refused 503 within {refused_by:?}, {held} held (buffered gauge sum {buffered}), \
         {SLOW_BODIES} slow bodies 408; RSS {idle_rss} → {peak_rss} KiB (+{grown}, bound {bound_kib}); \
         warm p50/p99 quiet {:?}/{:?}, during the flood {:?}/{:?}",
        VMS * PER_VM + SLOW_BODIES,
        percentile(&quiet, 0.5),
        percentile(&quiet, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
    );
    assert!(
        grown <= bound_kib,
        "RSS grew {grown} KiB, over the bound of {bound_kib} KiB"
    );

    // The guests come up: every held event is delivered, once.
    kube.hold_guests(false);
    let mut delivered = 0;
    while let Some(done) = tokio::time::timeout(Duration::from_secs(60), senders.join_next())
        .await
        .expect("held events answered once the VMs are up")
    {
        let (_, (status, _, _), _) = done.unwrap();
        assert_eq!(status, 202);
        delivered += 1;
    }
    assert_eq!(delivered, held);
    for v in 0..VMS {
        assert_eq!(kube.guest_events("apps", &format!("cold-{v}")).len(), MAX_BUFFERED);
    }
}

/// The path to a warm guest breaks in each way a network can, behind a fault proxy at the
/// guest's address: each event ends within the VM's `request_timeout` (2 s) with the
/// sender told why, and the VM is served again once the path heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_path_to_a_guest_ends_each_event_within_its_budget() {
    let kube = FakeKube::start(Options {
        guest_behind_proxy: true,
        ..Options::default()
    })
    .await;
    let mut vm = annotations("10m");
    vm["vm-activator.io/request-timeout"] = "2s".into();
    kube.create_opted_in_vm("apps", "svc", vm);
    let (_dir, activator) = support::kube::spawn_with_kubeconfig(&kube).await;
    activator.wait_status("/readyz", 200, Duration::from_secs(10)).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(activator.send_status("/apps/svc", "first").await, 202);
    let proxy = kube.guest_proxy("apps", "svc").expect("a proxy in front of the guest");

    let table = [
        // The guest gets the event, its answer never comes back.
        (Fault::BlackHole(Some(Direction::Down)), Some((504, "guest_timeout"))),
        // The guest reads nothing.
        (Fault::BlackHole(Some(Direction::Up)), Some((504, "guest_timeout"))),
        // Both ways, on new connections too.
        (Fault::BlackHole(None), Some((504, "guest_timeout"))),
        // The answer comes one byte every 200 ms: its head alone would take 20 s.
        (Fault::Trickle(Duration::from_millis(200)), Some((504, "guest_timeout"))),
        // Slow, but within the budget.
        (Fault::Delay(Duration::from_millis(50)), None),
        (Fault::None, None),
    ];
    for (i, (fault, expected)) in table.into_iter().enumerate() {
        proxy.set(fault);
        let sent = Instant::now();
        let (seen, took) = match expected {
            Some(_) => {
                let (seen, took) = send_one(&client, &activator, &format!("fault-{i}")).await;
                (Some(seen), took)
            }
            None => {
                assert_eq!(
                    activator.send_status("/apps/svc", &format!("fault-{i}")).await,
                    202,
                    "{fault:?}"
                );
                (None, sent.elapsed())
            }
        };
        eprintln!("{fault:?}: {seen:?} in {took:?}");
        assert_eq!(
            seen,
            expected.map(|(s, c)| Seen::Refused(s, c.to_string())),
            "{fault:?}"
        );
        assert!(took < Duration::from_secs(6), "{fault:?} took {took:?}");
    }

    // Cut mid-exchange: the request was sent, the connection dies before any answer.
    proxy.set(Fault::BlackHole(Some(Direction::Down)));
    let cutting = tokio::spawn({
        let proxy = proxy.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.cut();
        }
    });
    let (seen, took) = send_one(&client, &activator, "cut").await;
    cutting.await.unwrap();
    eprintln!("cut: {seen:?} in {took:?}");
    assert_eq!(seen, Seen::Refused(502, "guest_unreachable".into()));

    // Healed: served again (the endpoint is re-probed first).
    proxy.set(Fault::None);
    let healed = Instant::now();
    loop {
        let status = activator.send_status("/apps/svc", "healed").await;
        if status == 202 {
            break;
        }
        assert!(healed.elapsed() < Duration::from_secs(10), "not served again: {status}");
    }
}
