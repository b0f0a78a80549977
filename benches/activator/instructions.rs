//! Instructions per proxied warm request, counted by callgrind: the stable figure beside
//! the noisy req/s (it does not move with the machine's load). The real binary (KubeVirt
//! backend, fake API server) runs under `valgrind --tool=callgrind`; after a warm-up the
//! counters are zeroed, wrk sends warm events through it, the counters are dumped, and
//! the total is divided by the requests answered. Whatever else the process did meanwhile
//! (timers, watch bookmarks) is counted too, so the figure is an upper bound.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fake_kube::FakeKube;

use crate::load::Generator;
use crate::procs::ActivatorProcess;
use crate::report::target;
use crate::warm::{warm_annotations, warm_vm};
use crate::Mode;

/// DESIGN's target for the warm path.
const TARGET: f64 = 30_000.0;

/// Concurrency of the counted run: enough to keep the process busy, few enough that
/// callgrind's serialized threads are not starved.
const CONCURRENCY: usize = 4;

/// Runs the section; skipped without valgrind or wrk.
pub async fn run(mode: Mode, generator: &Generator) {
    println!("\n## Instructions per warm request (callgrind)\n");
    let Some(valgrind) = which("valgrind").zip(which("callgrind_control")) else {
        println!("Skipped: valgrind is not installed (apt-get install valgrind).");
        return;
    };
    if !matches!(generator, Generator::Wrk { .. }) {
        println!("Skipped: needs wrk (a load generator outside the counted process).");
        return;
    }
    let (valgrind, control) = valgrind;
    let kube = FakeKube::start(fake_kube::Options::default()).await;
    kube.create_opted_in_vm("bench", "counted", warm_annotations());
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let out = dir.path().join("callgrind.out");
    let wrapper = format!(
        "{} --tool=callgrind --callgrind-out-file={}",
        valgrind.display(),
        out.display()
    );
    let activator = ActivatorProcess::kubevirt_under(&wrapper, &kubeconfig, dir.path(), "").await;
    warm_vm(&kube, &activator, "counted").await;
    let url = format!("http://{}/bench/counted", activator.ingress);
    // Warm up: connections, pools, lazily built series, JIT-translated code.
    generator.run(&url, CONCURRENCY, Duration::from_secs(2)).await;
    let pid = activator.pid().to_string();
    callgrind_control(&control, &["-z", &pid]).await;
    let duration = Duration::from_secs(if mode.quick { 2 } else { 8 });
    let load = generator.run(&url, CONCURRENCY, duration).await;
    callgrind_control(&control, &["-d", &pid]).await;
    let Some(instructions) = last_dump_total(&out) else {
        println!("Skipped: callgrind wrote no dump to {}.", out.display());
        return;
    };
    let per_request = instructions as f64 / load.requests.max(1) as f64;
    if let Ok(keep) = std::env::var("BENCH_KEEP_CALLGRIND") {
        for entry in std::fs::read_dir(dir.path()).unwrap().filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("callgrind.out") {
                let _ = std::fs::copy(entry.path(), format!("{keep}.{name}"));
            }
        }
        println!("callgrind dumps kept: {keep}.* ({} requests)", load.requests);
    }
    println!("| requests counted | errors | instructions | per request |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {instructions} | {per_request:.0} |",
        load.requests, load.errors
    );
    target(
        "instructions per proxied request ≤ 30k (callgrind)",
        format!("{per_request:.0}"),
        per_request <= TARGET,
    );
}

/// Runs `callgrind_control` with `args`, waiting for it.
async fn callgrind_control(control: &Path, args: &[&str]) {
    let status = tokio::process::Command::new(control)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .expect("callgrind_control runs");
    assert!(status.success(), "callgrind_control {args:?} failed");
}

/// The instruction total of the newest dump next to `out` (`out.1`, `out.2`, …).
fn last_dump_total(out: &Path) -> Option<u64> {
    let dir = out.parent()?;
    let stem = out.file_name()?.to_str()?;
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(stem)))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())?;
    let text = std::fs::read_to_string(newest.path()).ok()?;
    dump_total(&text)
}

/// The `summary:` (or `totals:`) instruction count of one callgrind dump.
fn dump_total(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|line| line.strip_prefix("summary:").or_else(|| line.strip_prefix("totals:")))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// The executable `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}
