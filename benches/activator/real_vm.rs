//! Real VM: the binary with the local QEMU backend and the guest image of
//! `deploy/local/setup.sh` (skipped when either is missing): cold start from stopped to
//! the first delivered event, and resume from pause to the next delivered event.

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
    idle_timeout: 2s
    scale_down: {scale_down}
    concurrency: 4
    start_timeout: 120s
    machine:
      kernel: {kernel}
      initrd: {initrd}
      append: console=ttyS0 quiet panic=-1
      memory_mib: 256
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

/// Cold start and resume of a real QEMU guest (skipped without QEMU or the image).
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
    let samples = if mode.quick { 1 } else { 5 };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("qemu.yaml");
    let yaml = format!(
        "backend: qemu\nqemu:\n  accel: auto\n  stop_grace: 5s\nvms:\n{}{}",
        vm("stop-tier", "stop", &guest),
        vm("pause-tier", "pause", &guest)
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

    let stop_url = format!("http://{}/bench/stop-tier", activator.ingress);
    let mut cold = Vec::new();
    for i in 0..samples {
        wait_state(&activator, "stop-tier", "stopped").await;
        cold.push(deliver(&stop_url, &format!("cold-{i}")).await);
    }
    let pause_url = format!("http://{}/bench/pause-tier", activator.ingress);
    wait_state(&activator, "stop-tier", "stopped").await;
    deliver(&pause_url, "boot").await;
    let mut resumes = Vec::new();
    for i in 0..samples {
        wait_state(&activator, "pause-tier", "paused").await;
        resumes.push(deliver(&pause_url, &format!("resume-{i}")).await);
    }
    cold.sort();
    resumes.sort();
    println!("Accelerator: {accel}; guest: Debian cloud kernel + busybox initramfs, 1 vCPU, 256 MiB; {samples} samples each.\n");
    println!("| measure | p50 ms | max ms |");
    println!("|---|---:|---:|");
    println!(
        "| cold start: event sent → guest's 202 (VM stopped) | {} | {} |",
        ms(percentile(&cold, 0.5)),
        ms(*cold.last().expect("samples"))
    );
    println!(
        "| resume: event sent → guest's 202 (VM paused) | {} | {} |",
        ms(percentile(&resumes, 0.5)),
        ms(*resumes.last().expect("samples"))
    );
    println!(
        "\nActivator RSS idle with the QEMU backend (2 VMs configured, none running): {} MiB.",
        mib(idle.rss_kib)
    );
    target(
        "idle process ≤ 15 MiB RSS (local QEMU backend)",
        format!("{} MiB", mib(idle.rss_kib)),
        idle.rss_kib <= 15 * 1024,
    );
}
