//! Formatting: percentiles, units, the machine description, and the closing table of
//! The performance targets (docs/architecture.md) against what this run measured.

use std::sync::Mutex;
use std::time::Duration;

/// The `p` quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Microseconds, no decimals.
pub fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// Milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// KiB as MiB, one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// One line of the closing table.
pub struct Target {
    /// What the target asks.
    pub target: String,
    /// What this run measured.
    pub measured: String,
    /// Whether it was met.
    pub met: bool,
}

static TARGETS: Mutex<Vec<Target>> = Mutex::new(Vec::new());

/// Records a target's outcome for the closing table.
pub fn target(target: impl Into<String>, measured: impl Into<String>, met: bool) {
    TARGETS.lock().expect("targets").push(Target {
        target: target.into(),
        measured: measured.into(),
        met,
    });
}

/// Prints the closing table.
pub fn print_targets() {
    let targets = TARGETS.lock().expect("targets");
    println!("\n## Targets (docs/architecture.md) in this run\n");
    println!("| target | measured | met |");
    println!("|---|---|---|");
    for t in targets.iter() {
        println!(
            "| {} | {} | {} |",
            t.target,
            t.measured,
            if t.met { "yes" } else { "**no**" }
        );
    }
}

/// Cores, memory, CPU model and kernel of this machine.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB RAM, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}
