//! Scale: the real binary (KubeVirt backend) watching a fake cluster with one opted-in
//! VM and with 10,000; RSS of each, and warm-path latency to one VM among them.

use std::time::Duration;

use fake_kube::FakeKube;
use tokio::time::Instant;

use crate::load::Generator;
use crate::procs::{ActivatorProcess, Memory};
use crate::report::{mib, target, us};
use crate::warm::{warm_annotations, warm_vm};
use crate::Mode;

/// One activator in front of a fake cluster with `vms` opted-in VMs (one of them,
/// `bench/warm`, is booted and kept warm).
struct Setup {
    kube: FakeKube,
    activator: ActivatorProcess,
    _dir: tempfile::TempDir,
    /// RSS once the catalog is listed, before any event.
    idle: Memory,
    /// Start of the process → every VM listed in `/v1/vms`.
    listed_in: Duration,
}

async fn setup(vms: usize) -> Setup {
    let kube = FakeKube::start(fake_kube::Options::default()).await;
    kube.create_opted_in_vm("bench", "warm", warm_annotations());
    for i in 1..vms {
        kube.create_opted_in_vm(
            "bench",
            &format!("vm-{i:05}"),
            serde_json::json!({"vm-activator.io/readiness": "http:/healthz"}),
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let started = Instant::now();
    let activator = ActivatorProcess::kubevirt(&kubeconfig, dir.path(), "").await;
    activator.wait_vms(vms, Duration::from_secs(300)).await;
    let listed_in = started.elapsed();
    // Let start-up work (the first catalog sync, allocator warm-up) settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = activator.memory();
    Setup {
        kube,
        activator,
        _dir: dir,
        idle,
        listed_in,
    }
}

/// RSS and warm latency with 1 and 10,000 registered VMs.
pub async fn run(mode: Mode, generator: &Generator) {
    let many_vms = 10_000;
    let one = setup(1).await;
    let many = setup(many_vms).await;
    let duration = if mode.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    let mut rows = Vec::new();
    for setup in [&one, &many] {
        warm_vm(&setup.kube, &setup.activator, "warm").await;
    }
    for concurrency in [1usize, 16] {
        for (vms, setup) in [(1, &one), (many_vms, &many)] {
            let url = format!("http://{}/bench/warm", setup.activator.ingress);
            let result = generator.run(&url, concurrency, duration).await;
            rows.push((concurrency, vms, result));
        }
    }
    let (one_warm, many_warm) = (one.activator.memory(), many.activator.memory());

    println!("\n## Scale: the binary watching 1 and {many_vms} opted-in VMs (KubeVirt backend, fake cluster)\n");
    println!("| VMs registered | listed after start | RSS idle MiB | RSS after warm load MiB |");
    println!("|---:|---:|---:|---:|");
    for (vms, setup, warm) in [(1, &one, one_warm), (many_vms, &many, many_warm)] {
        println!(
            "| {vms} | {:.2} s | {} | {} |",
            setup.listed_in.as_secs_f64(),
            mib(setup.idle.rss_kib),
            mib(warm.rss_kib)
        );
    }
    println!("\nWarm path to one VM ({}):\n", generator.describe());
    println!("| concurrency | VMs registered | req/s | p50 µs | p99 µs | errors |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (concurrency, vms, r) in &rows {
        println!(
            "| {concurrency} | {vms} | {:.0} | {} | {} | {} |",
            r.rps,
            us(r.p50),
            us(r.p99),
            r.errors
        );
    }
    let one_p50 = rows[0].2.p50;
    let many_p50 = rows[1].2.p50;
    println!(
        "\np50 with {many_vms} VMs / with 1 VM at concurrency 1: {:.2}",
        many_p50.as_secs_f64() / one_p50.as_secs_f64()
    );
    target(
        format!("{many_vms} registered VMs ≤ 50 MiB RSS"),
        format!("{} MiB", mib(many.idle.rss_kib.max(many_warm.rss_kib))),
        many.idle.rss_kib.max(many_warm.rss_kib) <= 50 * 1024,
    );
    target(
        "idle process ≤ 15 MiB RSS",
        format!("{} MiB (KubeVirt backend, 1 VM)", mib(one.idle.rss_kib)),
        one.idle.rss_kib <= 15 * 1024,
    );
}
