//! End to end through the real binary and a real QEMU guest built by
//! `deploy/local/build-guest.sh`, with `config/local.yaml` (idle timeout edited down):
//! a burst of 100 events cold-starts the VM once and each is delivered exactly once;
//! the idle VM's QEMU process goes away; the next event boots it again; SIGTERM
//! exits cleanly and takes the VM with it.
//!
//! Needs `qemu-system-x86_64` and the guest image (`deploy/local/setup.sh` installs
//! both). Set `VM_ACTIVATOR_SKIP_QEMU=1` to skip where QEMU cannot run.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures_util::future::join_all;
use support::binary::Activator;
use tokio::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn prerequisites_missing() -> Option<String> {
    let guest = repo().join("target/guest");
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        if !guest.join(file).is_file() {
            return Some(format!("{} is missing", guest.join(file).display()));
        }
    }
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        return Some("qemu-system-x86_64 is not installed".into());
    }
    None
}

/// Whether to skip a real-VM test: only where QEMU or the guest image is missing *and*
/// `VM_ACTIVATOR_SKIP_QEMU=1` says that is expected; otherwise a missing prerequisite fails.
fn skip_without_qemu() -> bool {
    let Some(missing) = prerequisites_missing() else {
        return false;
    };
    if std::env::var("VM_ACTIVATOR_SKIP_QEMU").as_deref() == Ok("1") {
        eprintln!("skipping: {missing}");
        return true;
    }
    panic!("{missing}: run deploy/local/setup.sh (or set VM_ACTIVATOR_SKIP_QEMU=1)");
}

/// `config/local.yaml` with the idle timeout edited (as a user would with sed), the
/// guest image paths made absolute and a private run directory.
fn write_config(dir: &Path, idle_timeout: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("config/local.yaml")).unwrap();
    assert!(text.contains("idle_timeout: 30s") && text.contains("max_buffered: 1000"));
    let guest = repo().join("target/guest");
    let text = text
        .replace("idle_timeout: 30s", &format!("idle_timeout: {idle_timeout}"))
        .replace("../target/guest", guest.to_str().unwrap())
        .replace(
            "stop_grace: 5s",
            &format!("stop_grace: 5s\n  run_dir: {}", dir.join("run").display()),
        );
    let path = dir.join("local.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn cold_starts(activator: &Activator) -> f64 {
    activator
        .metric("vm_activator_cold_start_seconds_count{namespace=\"default\",vm=\"demo\"}")
        .await
}

async fn vm(activator: &Activator) -> serde_json::Value {
    activator.vm("default", "demo").await.expect("default/demo is listed")
}

/// The guest's own record of received event ids (`GET /events` on the guest).
async fn guest_events(activator: &Activator) -> Vec<String> {
    let endpoint = vm(activator).await["endpoint"]
        .as_str()
        .expect("VM running")
        .to_string();
    let text = reqwest::get(format!("http://{endpoint}/events"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().map(str::to_string).collect()
}

fn qemu_children(pid: u32) -> usize {
    let output = Command::new("pgrep")
        .args(["-P", &pid.to_string(), "qemu-system"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_cold_start_burst_idle_stop_and_reboot() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "4s");
    let mut activator = Activator::spawn(&["--config", config.to_str().unwrap()]).await;
    assert_eq!(vm(&activator).await["state"], "stopped");
    assert_eq!(qemu_children(activator.child.id()), 0);

    // 100 different events while the VM is stopped: one cold start for all of them.
    let ids: Vec<String> = (0..100).map(|i| format!("burst-{i}")).collect();
    let started = Instant::now();
    let codes = join_all(ids.iter().map(|id| activator.send_status("/default/demo", id))).await;
    let took = started.elapsed();
    let mut by_code: HashMap<u16, usize> = HashMap::new();
    for code in codes {
        *by_code.entry(code).or_default() += 1;
    }
    assert_eq!(by_code.get(&202), Some(&100), "status codes: {by_code:?}");
    assert_eq!(cold_starts(&activator).await, 1.0);
    let events = guest_events(&activator).await;
    assert_eq!(events.len(), 100, "each event exactly once: {events:?}");
    assert_eq!(
        events.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    assert_eq!(qemu_children(activator.child.id()), 1);
    eprintln!(
        "burst of 100 through one cold start: {took:?} (cold start {} ms)",
        vm(&activator).await["last_cold_start_ms"]
    );

    // Idle: the QEMU process goes away and the VM shows stopped.
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm(&activator).await["state"] != "stopped" || qemu_children(activator.child.id()) > 0 {
        assert!(
            Instant::now() < deadline,
            "VM not stopped after idle: {}",
            vm(&activator).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The next event boots it again, and reaches the new guest exactly once.
    assert_eq!(activator.send_status("/default/demo", "after-idle").await, 202);
    assert_eq!(cold_starts(&activator).await, 2.0);
    assert_eq!(guest_events(&activator).await, vec!["after-idle"]);

    // SIGTERM: clean exit, VM stopped with it.
    assert_eq!(qemu_children(activator.child.id()), 1);
    let status = activator.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    let qemu_left = Command::new("pgrep")
        .args(["-f", &dir.path().join("run").display().to_string()])
        .output()
        .unwrap();
    assert!(qemu_left.stdout.is_empty(), "QEMU outlived the activator");
}

/// Asks the admin API to hibernate the VM now and waits until it is.
async fn hibernate(activator: &Activator) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/vms/default/demo/hibernate", activator.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    activator
        .wait_vm_state("default", "demo", "hibernated", Duration::from_secs(60))
        .await;
    assert_eq!(qemu_children(activator.child.id()), 0, "hibernated: no QEMU process");
}

async fn restores(activator: &Activator) -> f64 {
    activator
        .metric("vm_activator_cold_start_phase_seconds_count{namespace=\"default\",phase=\"restore\",vm=\"demo\"}")
        .await
}

/// Hibernate and back: the guest keeps its memory (its in-memory `/events` log survives)
/// and the events held across the restore are delivered once; a truncated state file
/// and one QEMU refuses both fall back to a boot that loses no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_hibernates_and_continues_where_it_was() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "1h");
    let mut activator = Activator::spawn(&["--config", config.to_str().unwrap()]).await;
    let state_file = dir.path().join("run/default_demo.state");
    for id in ["before-1", "before-2"] {
        assert_eq!(activator.send_status("/default/demo", id).await, 202);
    }

    hibernate(&activator).await;
    assert!(state_file.is_file(), "the state is on disk");
    let listed = vm(&activator).await;
    assert!(
        listed["reason"].as_str().unwrap().starts_with("hibernated:"),
        "{listed}"
    );
    assert_eq!(
        activator
            .metric("vm_activator_scale_downs_total{action=\"hibernate\",namespace=\"default\",vm=\"demo\"}")
            .await,
        1.0
    );

    // Held across the restore, delivered once each; the guest remembers what it had.
    let ids: Vec<String> = (0..20).map(|i| format!("held-{i}")).collect();
    let codes = join_all(ids.iter().map(|id| activator.send_status("/default/demo", id))).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    let events = guest_events(&activator).await;
    assert_eq!(events[..2], ["before-1", "before-2"], "memory survived: {events:?}");
    assert_eq!(
        events[2..].iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    assert_eq!(events.len(), 22, "each exactly once: {events:?}");
    assert_eq!(restores(&activator).await, 1.0);
    assert_eq!(cold_starts(&activator).await, 2.0);
    assert!(!state_file.exists(), "a restored state is spent");
    let listed = vm(&activator).await;
    assert!(
        listed["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("restored from a hibernated state"),
        "{listed}"
    );

    // A truncated state file: caught by its sidecar, the VM boots, the event arrives.
    hibernate(&activator).await;
    let bytes = std::fs::metadata(&state_file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state_file)
        .unwrap()
        .set_len(bytes / 2)
        .unwrap();
    assert_eq!(activator.send_status("/default/demo", "after-truncation").await, 202);
    assert_eq!(guest_events(&activator).await, ["after-truncation"], "a fresh boot");
    let listed = vm(&activator).await;
    assert!(
        listed["reason"].as_str().unwrap_or_default().contains("truncated"),
        "{listed}"
    );

    // A state QEMU refuses (its stream header overwritten, its size unchanged): QEMU
    // exits, the VM boots instead, the event arrives.
    hibernate(&activator).await;
    {
        use std::io::{Seek, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&state_file).unwrap();
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        file.write_all(b"not a QEMU migration stream").unwrap();
    }
    assert_eq!(activator.send_status("/default/demo", "after-corruption").await, 202);
    assert_eq!(guest_events(&activator).await, ["after-corruption"], "a fresh boot");
    let listed = vm(&activator).await;
    assert!(
        listed["reason"].as_str().unwrap_or_default().contains("could not load"),
        "{listed}"
    );
    assert!(!state_file.exists(), "a bad state is removed");
    assert_eq!(
        restores(&activator).await,
        1.0,
        "the fallbacks count as the boots they were"
    );
    let boots = "vm_activator_cold_start_phase_seconds_count{namespace=\"default\",phase=\"boot\",vm=\"demo\"}";
    assert_eq!(activator.metric(boots).await, 3.0);

    // Stopped for good: the state goes with it.
    hibernate(&activator).await;
    assert!(state_file.is_file());
    let stop = reqwest::Client::new()
        .post(format!("{}/v1/vms/default/demo/stop", activator.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 202);
    activator
        .wait_vm_state("default", "demo", "stopped", Duration::from_secs(30))
        .await;
    assert!(!state_file.exists(), "stopped for good: no state left");
    let status = activator.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
}

/// `write_config` with the adaptive idle policy for the VM, in one-second bins (every
/// bound of the policy scaled down sixty times) and a fallback idle timeout of 4 s.
fn write_adaptive_config(dir: &Path) -> PathBuf {
    let path = write_config(dir, "4s");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("idle_timeout: 4s", "idle_timeout: 4s\n    idle_policy: adaptive")
        + "\nidle:\n  adaptive:\n    bin: 1s\n    range: 2m\n    cold_start_cost: 50s\n";
    std::fs::write(&path, text).unwrap();
    path
}

/// The metric of pre-warms an event found (the VM started ahead of it).
const PREWARMS_USED: &str = "vm_activator_prewarm_total{namespace=\"default\",outcome=\"used\",vm=\"demo\"}";

/// What an event found when it came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    /// The adaptive policy had started the VM ahead of it (a pre-warm it used).
    PreWarmed,
    /// The VM running on: the plan chose not to stop it before this event.
    Running,
    /// The VM stopped: the event waited for a cold start.
    ColdStart,
}

/// The cold starts that ended, counted by the activator.
const COLD_STARTS: &str = "vm_activator_cold_start_seconds_count{namespace=\"default\",vm=\"demo\"}";

/// Sends one event at `at`; returns what it found. Told by the activator's own counts,
/// not by the event's latency: under TCG on a loaded machine a boot started well ahead
/// may still be booting when the event comes (seen in the soak: 8 s boots), and the
/// policy's decision is what is tested.
async fn event_at(activator: &Activator, id: &str, at: Instant) -> Found {
    tokio::time::sleep_until(at).await;
    let (prewarms, cold_starts) = (
        activator.metric(PREWARMS_USED).await,
        activator.metric(COLD_STARTS).await,
    );
    let sent = Instant::now();
    assert_eq!(activator.send_status("/default/demo", id).await, 202, "{id}");
    eprintln!("{id}: {:?}", sent.elapsed());
    if activator.metric(PREWARMS_USED).await > prewarms {
        Found::PreWarmed
    } else if activator.metric(COLD_STARTS).await > cold_starts {
        Found::ColdStart
    } else {
        Found::Running
    }
}

/// The adaptive idle policy on a real guest: fed one event a period, the VM learns the
/// period within five periods, then is powered off between events and booted just
/// before each; a restarted activator (same run directory) pre-warms from the history
/// file it finds there. The period is 10 s, or 2.5 times the first cold start when the
/// machine boots slower than that (a TCG boot under load took 10.6 s in a soak run: with
/// boots as long as the period, running on is the plan's right answer and there is
/// nothing to learn to stop for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_adaptive_policy_learns_the_period_and_a_restart_keeps_it() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_adaptive_config(dir.path());
    let history_file = dir.path().join("run/default_demo.idle-history");
    let mut first = Activator::spawn(&["--config", config.to_str().unwrap()]).await;
    let stops = "vm_activator_scale_downs_total{action=\"stop\",namespace=\"default\",vm=\"demo\"}";

    let mut at = Instant::now();
    let (mut ahead, mut downs) = (Vec::new(), Vec::new());
    let mut period = Duration::from_secs(10);
    for i in 0..7 {
        ahead.push(event_at(&first, &format!("e-{i}"), at).await);
        downs.push(first.metric(stops).await);
        if i == 0 {
            let cold_start = at.elapsed();
            period = period.max(Duration::from_secs(cold_start.mul_f64(2.5).as_secs() + 1));
            eprintln!("first cold start {cold_start:?}: one event every {period:?}");
        }
        at += period;
    }
    eprintln!("found: {ahead:?}; scale-downs before each event: {downs:?}");
    // Learned within five periods: no event from then on waits for a cold start — each
    // finds the VM started ahead of it, or running on where the plan chose not to stop
    // (a boot that took most of the period on a loaded machine: seen in CI with 4.7 s
    // boots).
    assert!(
        ahead[4..].iter().all(|found| *found != Found::ColdStart),
        "learned within 5 periods: {ahead:?}"
    );
    assert!(
        ahead[4..].contains(&Found::PreWarmed),
        "started ahead of an event: {ahead:?}"
    );
    // Powered off between learned events. Not necessarily between every pair: the plan
    // weighs the stop against the target's measured cold start, and on a loaded machine a
    // boot that took most of the period makes running on to the next event the better
    // choice (seen once in CI while another build ran: 3.7 s boots, one gap kept running).
    let stopped_between = downs.windows(2).skip(3).filter(|d| d[1] > d[0]).count();
    assert!(stopped_between >= 2, "powered off between events: {downs:?}");
    let listed = vm(&first).await;
    assert_eq!(listed["idle"]["learned"], true, "{listed}");

    // Scaled down after the last event: the history is in the run directory.
    first
        .wait_vm_state("default", "demo", "stopped", Duration::from_secs(8))
        .await;
    let text = std::fs::read_to_string(&history_file).expect("the history file");
    let history = vm_activator::idle_policy::History::parse(text.trim()).unwrap();
    assert!(history.samples() >= 6, "{history}");

    // A restart: the new process has seen nothing, and pre-warms for the next event.
    assert!(first.terminate(Duration::from_secs(30)).await.success());
    let second = Activator::spawn(&["--config", config.to_str().unwrap()]).await;
    assert_eq!(
        event_at(&second, "after-restart", at).await,
        Found::PreWarmed,
        "a restarted activator pre-warmed from the history file"
    );
    assert_eq!(second.metric(PREWARMS_USED).await, 1.0);
    assert_eq!(guest_events(&second).await, ["after-restart"]);
}

/// A VM whose plan hibernates keeps its RAM in a file: a hibernation writes only the
/// device state (under a MiB instead of tens), a restore maps the RAM file — the guest's
/// memory survives — and a RAM file changed behind the activator's back is a boot, not a
/// restore of the wrong memory; a VM stopped for good loses its RAM file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_with_its_ram_in_a_file_saves_device_state_only() {
    if skip_without_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "1h");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("idle_timeout: 1h", "idle_timeout: 1h\n    scale_down: hibernate");
    std::fs::write(&config, text).unwrap();
    let mut activator = Activator::spawn(&["--config", config.to_str().unwrap()]).await;
    let (state, ram) = (
        dir.path().join("run/default_demo.state"),
        dir.path().join("run/default_demo.ram"),
    );
    for id in ["before-1", "before-2"] {
        assert_eq!(activator.send_status("/default/demo", id).await, 202);
    }
    assert!(ram.is_file(), "the running guest's RAM is in its file");

    hibernate(&activator).await;
    let state_bytes = std::fs::metadata(&state).unwrap().len();
    assert!(state_bytes < 4 * 1024 * 1024, "device state only: {state_bytes} bytes");
    assert!(ram.is_file());
    let ids: Vec<String> = (0..10).map(|i| format!("held-{i}")).collect();
    let codes = join_all(ids.iter().map(|id| activator.send_status("/default/demo", id))).await;
    assert!(codes.iter().all(|c| *c == 202), "{codes:?}");
    let events = guest_events(&activator).await;
    assert_eq!(events[..2], ["before-1", "before-2"], "memory survived: {events:?}");
    assert_eq!(events.len(), 12, "each exactly once: {events:?}");
    assert_eq!(restores(&activator).await, 1.0);
    let listed = vm(&activator).await;
    assert!(
        listed["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("RAM mapped from its file"),
        "{listed}"
    );

    // The RAM file rewritten behind the activator's back: not restored, booted.
    hibernate(&activator).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ram)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert_eq!(activator.send_status("/default/demo", "after-tampering").await, 202);
    assert_eq!(guest_events(&activator).await, ["after-tampering"], "a fresh boot");
    let listed = vm(&activator).await;
    assert!(
        listed["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("RAM file changed"),
        "{listed}"
    );
    assert_eq!(restores(&activator).await, 1.0);

    // Stopped for good: no state, no RAM file.
    let stop = reqwest::Client::new()
        .post(format!("{}/v1/vms/default/demo/stop", activator.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(stop.status(), 202);
    activator
        .wait_vm_state("default", "demo", "stopped", Duration::from_secs(30))
        .await;
    assert!(!state.exists() && !ram.exists(), "stopped for good: nothing left");
    let status = activator.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
}
