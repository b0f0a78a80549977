//! vm-activator benchmarks: one table per section, side by side in one run (timings on
//! a shared 2-core machine are noisy: read the ratios, not the absolute numbers).
//!
//! - `warm`: wrk (or a hyper client) against the guest directly, through the real
//!   binary, and through nginx `proxy_pass`.
//! - `traces`: the warm path with traces off (the default) and on (every request
//!   exported over OTLP/HTTP), side by side.
//! - `allocs`: heap allocations per warm request (counting allocator, in process).
//! - `instructions`: instructions per warm request, the binary under callgrind.
//! - `cold`: cold-start overhead and start signal (fake backend, in process), and cold
//!   starts through the KubeVirt backend against the fake API server.
//! - `burst`: 10,000 events held during one cold start of the real binary; delivery
//!   checked against the guest's log; RSS growth per held event.
//! - `scale`: RSS with 10,000 registered VMs and warm latency among them vs. one VM.
//! - `real_vm`: the local QEMU backend (when QEMU and the guest image are present):
//!   cold start to first delivered event, resume from pause.
//!
//! `cargo bench` for the full run; `cargo bench -- --quick` (or BENCH_QUICK=1) for the
//! smoke run CI does. `BENCH_ONLY=warm,burst` runs some sections; BENCH_DEBUG=1 logs
//! each cold start step of the in-process activator; BENCH_ACTIVATOR_LOG sets RUST_LOG
//! of the binary (default `warn`); BENCH_LOADGEN=hyper forces the in-process client;
//! BENCH_SERVE=N keeps the warm-path targets up N seconds first (for a profiler);
//! BENCH_ACTIVATOR_WRAPPER prefixes the binary's command (e.g. valgrind --tool=massif);
//! BENCH_KEEP_CALLGRIND=PREFIX keeps the `instructions` section's callgrind dumps as
//! PREFIX.callgrind.out.N (for `callgrind_annotate`).

mod allocs;
mod burst;
mod cold;
mod instructions;
mod load;
mod procs;
mod real_vm;
mod report;
mod scale;
mod traces;
mod warm;

use std::time::Duration;

use tokio::time::Instant;

/// Full or smoke run.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// Smoke run: fewer samples, shorter load.
    pub quick: bool,
}

/// POSTs one event until it is accepted (the VM may not be listed yet).
pub async fn send_until_accepted(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = burst::post_once(url, "warm-up", b"{}").await;
        if (200..300).contains(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{url} kept answering {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts the process's heap allocations (the `allocs` section reads the count).
#[global_allocator]
static ALLOCATOR: allocs::Counting = allocs::Counting;

fn main() {
    if std::env::var("BENCH_DEBUG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter("vm_activator=debug")
            .with_writer(std::io::stderr)
            .init();
    }
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let mode = Mode { quick };
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let generator = load::Generator::detect(dir.path());
    println!(
        "# vm-activator benchmarks ({} mode)",
        if quick { "quick" } else { "full" }
    );
    println!("\nMachine: {}.", report::machine());
    runtime.block_on(async {
        if wanted("warm") {
            warm::run(mode, &generator).await;
        }
        if wanted("traces") {
            traces::run(mode, &generator).await;
        }
        if wanted("allocs") {
            allocs::run(mode, &generator).await;
        }
        if wanted("instructions") {
            instructions::run(mode, &generator).await;
        }
        if wanted("cold") {
            cold::fake_backend(mode).await;
            cold::kubevirt(mode).await;
        }
        if wanted("burst") {
            burst::run(mode).await;
        }
        if wanted("scale") {
            scale::run(mode, &generator).await;
        }
        if wanted("real_vm") {
            real_vm::run(mode).await;
        }
    });
    report::print_targets();
}
