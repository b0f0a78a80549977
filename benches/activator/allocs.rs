//! Heap allocations per warm request, counted in this process by the bench binary's
//! counting allocator (the product has none): the activator's server runs in-process
//! over the fake backend, the load generator (wrk) outside it. The guest is in-process
//! too, so its own allocations per request are measured by loading it directly, and
//! subtracted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vm_activator::backend::fake::{FakeBackend, FakeOptions};
use vm_activator::config::Config;
use vm_activator::vm::{Policy, VmKey};

use crate::load::Generator;
use crate::report::target;
use crate::Mode;

/// Counts allocations (and reallocations) of the whole bench process.
pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is
// added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations per request of a load run against `url`.
async fn per_request(generator: &Generator, url: &str, concurrency: usize, duration: Duration) -> f64 {
    // Warm up first: connections, pools, lazily created series.
    generator.run(url, concurrency, Duration::from_millis(500)).await;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let result = generator.run(url, concurrency, duration).await;
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    allocations as f64 / (result.rps * duration.as_secs_f64()).max(1.0)
}

/// The activator in-process in front of a fake guest; allocations per request through
/// it minus the guest's own.
pub async fn run(mode: Mode, generator: &Generator) {
    if !matches!(generator, Generator::Wrk { .. }) {
        println!("\n## Heap allocations per warm request\n\nSkipped: needs wrk (an in-process load generator would be counted too).");
        return;
    }
    let key = VmKey::new("bench", "allocs");
    let policy = Policy {
        idle_timeout: Duration::from_secs(3600),
        readiness: "http:/healthz".parse().expect("readiness"),
        ..Policy::default()
    };
    let backend = FakeBackend::new([(key, policy)], FakeOptions::default());
    let server = vm_activator::server::start(Config::for_tests(), backend)
        .await
        .expect("the activator starts");
    let url = format!("http://{}/bench/allocs", server.ingress_addr);
    crate::send_until_accepted(&url).await;
    let vm = server.activator.vm("bench", "allocs").expect("the VM");
    let guest = vm.gate().state().targets[0].endpoint();
    let direct = format!("http://{guest}/");
    let duration = if mode.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    println!("\n## Heap allocations per warm request (counted in-process; wrk outside)\n");
    println!("| concurrency | guest alone | through the activator | the activator's |");
    println!("|---:|---:|---:|---:|");
    let mut worst: f64 = 0.0;
    for concurrency in [1, 16] {
        let guest_alone = per_request(generator, &direct, concurrency, duration).await;
        let through = per_request(generator, &url, concurrency, duration).await;
        let own = through - guest_alone;
        worst = worst.max(own);
        println!("| {concurrency} | {guest_alone:.1} | {through:.1} | {own:.1} |");
    }
    target(
        "heap allocations per proxied request ≤ 12",
        format!("{worst:.1} (the most of c = 1, 16)"),
        worst <= 12.0,
    );
    server.drain().await;
}
