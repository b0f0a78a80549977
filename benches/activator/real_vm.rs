//! Real VM: the binary with the local QEMU backend and the guest image of
//! `deploy/local/setup.sh` (skipped when either is missing): the three idle tiers side by
//! side — boot from stopped, resume from pause, restore from hibernation — each to the
//! guest's answer to one event, plus the hibernated state's size and save time.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::burst::post_once;
use crate::procs::ActivatorProcess;
use crate::report::{mib, ms, percentile, target};
use crate::Mode;

fn vm(name: &str, scale_down: &str, guest: &Path) -> String {
    format!(
        r#"  - namespace: bench
    name: {name}
    port: 8080
    readiness: http:/healthz
    idle_timeout: 1h
    scale_down: {scale_down}
    concurrency: 4
    start_timeout: 120s
    machine:
      kernel: {kernel}
      initrd: {initrd}
      append: console=ttyS0 quiet panic=-1 init_on_free=1
      memory_mib: 128
      cpus: 1
"#,
        kernel = guest.join("vmlinuz").display(),
        initrd = guest.join("initramfs.cpio.gz").display(),
    )
}

/// Sends one event; waits for a 2xx; returns how long it took.
async fn deliver(url: &str, id: &str) -> Duration {
    let sent = Instant::now();
    let status = post_once(url, id, b"{\"bench\":true}").await;
    assert!((200..300).contains(&status), "{url} answered {status}");
    sent.elapsed()
}

async fn wait_state(activator: &ActivatorProcess, name: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while activator.vm_state("bench", name).await != state {
        assert!(Instant::now() < deadline, "{name} never became {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scales `name` down now through the admin API (`stop`, `pause` or `hibernate`) and
/// waits until it shows `state`.
async fn scale_down(activator: &ActivatorProcess, name: &str, verb: &str, state: &str) {
    let url = format!("http://{}/v1/vms/bench/{name}/{verb}", activator.admin);
    let status = post_once(&url, "admin", b"").await;
    assert_eq!(status, 202, "{verb} {name}");
    wait_state(activator, name, state).await;
}

/// The VM's `reason` in `/v1/vms`.
async fn reason(activator: &ActivatorProcess, name: &str) -> String {
    let (_, body) = activator.admin_get("/v1/vms").await;
    let vms: serde_json::Value = serde_json::from_str(&body).expect("/v1/vms is JSON");
    vms.as_array()
        .into_iter()
        .flatten()
        .find(|vm| vm["namespace"] == "bench" && vm["name"] == name)
        .and_then(|vm| vm["reason"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The number right before `unit` in `text` (e.g. "saved in 812 ms" → 812).
fn number_before(text: &str, unit: &str) -> Option<f64> {
    let at = text.find(unit)?;
    text[..at].split_whitespace().last()?.parse().ok()
}

/// Cycles of one tier: scale down by `verb`, then time an event to the guest's 202.
async fn cycles(activator: &ActivatorProcess, name: &str, verb: &str, state: &str, samples: usize) -> Vec<Duration> {
    let url = format!("http://{}/bench/{name}", activator.ingress);
    deliver(&url, "boot").await;
    let mut taken = Vec::new();
    for i in 0..samples {
        scale_down(activator, name, verb, state).await;
        taken.push(deliver(&url, &format!("{verb}-{i}")).await);
    }
    taken.sort();
    taken
}

/// Boot, pause-resume and hibernate-resume of a real QEMU guest, side by side
/// (skipped without QEMU or the image).
pub async fn run(mode: Mode) {
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest");
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    println!("\n## Real VM (local QEMU backend, guest image of deploy/local/setup.sh)\n");
    if !qemu || !guest.join("vmlinuz").exists() {
        println!("Skipped: needs qemu-system-x86_64 and target/guest (run deploy/local/setup.sh).");
        return;
    }
    let samples = if mode.quick { 1 } else { 10 };
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().join("run");
    let config = dir.path().join("qemu.yaml");
    let yaml = format!(
        "backend: qemu\nqemu:\n  accel: auto\n  stop_grace: 5s\n  run_dir: {}\nvms:\n{}{}{}",
        run_dir.display(),
        vm("stop-tier", "stop", &guest),
        vm("pause-tier", "pause", &guest),
        vm("hibernate-tier", "hibernate", &guest),
    );
    std::fs::write(&config, yaml).expect("write config");
    let activator = ActivatorProcess::spawn(&["--config".into(), config.display().to_string()]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = activator.memory();
    let accel = if std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" vmx") || c.contains(" svm")) {
        "KVM"
    } else {
        "TCG (no KVM on this CPU)"
    };

    let boots = cycles(&activator, "stop-tier", "stop", "stopped", samples).await;
    scale_down(&activator, "stop-tier", "stop", "stopped").await;
    let resumes = cycles(&activator, "pause-tier", "pause", "paused", samples).await;
    scale_down(&activator, "pause-tier", "stop", "stopped").await;
    // Hibernate cycles, with the save's own figures read after each.
    let url = format!("http://{}/bench/hibernate-tier", activator.ingress);
    deliver(&url, "boot").await;
    let (mut restores, mut saves, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        scale_down(&activator, "hibernate-tier", "hibernate", "hibernated").await;
        let saved = reason(&activator, "hibernate-tier").await;
        if let Some(took) = number_before(&saved, "ms") {
            saves.push(Duration::from_secs_f64(took / 1000.0));
        }
        if let Ok(meta) = std::fs::metadata(run_dir.join("bench_hibernate-tier.state")) {
            sizes.push(meta.len());
        }
        restores.push(deliver(&url, &format!("restore-{i}")).await);
        let restored = reason(&activator, "hibernate-tier").await;
        assert!(
            restored.starts_with("restored"),
            "the hibernate tier booted instead of restoring: {restored}"
        );
    }
    restores.sort();
    saves.sort();
    sizes.sort();
    println!("Accelerator: {accel}; guest: Debian cloud kernel + busybox initramfs, 1 vCPU, 128 MiB, init_on_free=1; {samples} cycles per tier (scale-down by the admin API, then one event).\n");
    println!("| tier: event sent → guest's 202 | p50 ms | max ms |");
    println!("|---|---:|---:|");
    for (tier, taken) in [
        ("boot (VM stopped)", &boots),
        ("resume (VM paused: RAM kept)", &resumes),
        ("restore (VM hibernated: RAM on disk)", &restores),
    ] {
        println!(
            "| {tier} | {} | {} |",
            ms(percentile(taken, 0.5)),
            ms(*taken.last().expect("samples"))
        );
    }
    if let (Some(size), Some(save)) = (sizes.get(sizes.len() / 2), saves.get(saves.len() / 2)) {
        println!(
            "\nHibernate: state file p50 {:.1} MiB (the guest's RAM is 128 MiB), save (stop → synced, renamed file) p50 {} ms, max {} ms.",
            *size as f64 / (1024.0 * 1024.0),
            ms(*save),
            ms(*saves.last().expect("samples"))
        );
    }
    println!(
        "\nActivator RSS idle with the QEMU backend (3 VMs configured, none running): {} MiB.",
        mib(idle.rss_kib)
    );
    let restore_p50 = percentile(&restores, 0.5);
    target(
        "hibernate tier: restore to the first delivered event p50 ≤ 300 ms (local guest)",
        format!("p50 {} ms", ms(restore_p50)),
        restore_p50 <= Duration::from_millis(300),
    );
    target(
        "idle process ≤ 15 MiB RSS (local QEMU backend)",
        format!("{} MiB", mib(idle.rss_kib)),
        idle.rss_kib <= 15 * 1024,
    );
}
