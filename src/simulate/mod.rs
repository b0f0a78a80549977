//! `vm-activator simulate`: idle policies on a real invocation trace, in simulated time,
//! with the same policy code the VMs' owners run (`idle_policy`).
//!
//! ```text
//! vm-activator simulate --trace FILE --policy adaptive --policy fixed:10m [--boot 1m] [--json]
//! ```
//!
//! Per policy: targets, minutes with events, cold starts, running minutes, and the median
//! and 75th percentile of each target's cold-start percentage (`engine.rs` says what
//! counts). `trace.rs` reads the trace; this file parses the policies and prints.
//!
//! Owns: the subcommand. Must not import anything but `idle_policy`.

mod engine;
mod trace;

pub use engine::{simulate, Outcome, PolicySpec};
pub use trace::{Target, Trace, TraceError};

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::idle_policy::Settings;

/// The flags of `vm-activator simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The trace: the Azure Functions 2019 per-minute format (one row per target), or
    /// `target,unix_seconds` lines.
    #[arg(long)]
    pub trace: PathBuf,
    /// A policy to run, in the order given: `fixed:DURATION`, or `adaptive` with optional
    /// settings `adaptive:KEY=VALUE,...` (bin, range, min-keep-alive, max-keep-alive,
    /// cold-start-cost, min-samples, and fallback: the idle timeout until it has learned,
    /// default 10m). Repeat to compare; at least one.
    #[arg(long = "policy", required = true)]
    pub policies: Vec<PolicyArg>,
    /// How long a start takes until the target is ready.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub boot: Duration,
    /// Print a JSON list, one object per policy, instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A `--policy` value: its text and what it means.
#[derive(Clone, Debug)]
pub struct PolicyArg {
    text: String,
    spec: PolicySpec,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a duration like 30s or 10m"))
}

impl FromStr for PolicyArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, options) = text.split_once(':').unwrap_or((text, ""));
        let spec = match name {
            "fixed" => PolicySpec::Fixed(parse_duration(options).map_err(|e| format!("fixed:DURATION: {e}"))?),
            "adaptive" => {
                let (mut settings, mut fallback) = (Settings::default(), Duration::from_secs(600));
                for option in options.split(',').filter(|o| !o.is_empty()) {
                    let (key, value) = option
                        .split_once('=')
                        .ok_or_else(|| format!("{option:?} is not KEY=VALUE"))?;
                    let duration = || parse_duration(value).map_err(|e| format!("{key}: {e}"));
                    match key {
                        "bin" => settings.bin = duration()?,
                        "range" => settings.range = duration()?,
                        "min-keep-alive" => settings.min_keep_alive = duration()?,
                        "max-keep-alive" => settings.max_keep_alive = duration()?,
                        "cold-start-cost" => settings.cold_start_cost = duration()?,
                        "fallback" => fallback = duration()?,
                        "min-samples" => {
                            settings.min_samples = value.parse().map_err(|_| format!("min-samples: {value:?}"))?
                        }
                        _ => return Err(format!("unknown adaptive setting {key:?}")),
                    }
                }
                settings.check().map_err(|(key, message)| format!("{key}: {message}"))?;
                PolicySpec::Adaptive { settings, fallback }
            }
            _ => return Err(format!("{text:?}: expected fixed:DURATION or adaptive[:KEY=VALUE,...]")),
        };
        Ok(PolicyArg {
            text: text.to_string(),
            spec,
        })
    }
}

/// One policy's result over the whole trace.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The `--policy` value.
    pub policy: String,
    /// Targets with events.
    pub targets: usize,
    /// Minutes with events, over all targets.
    pub event_minutes: u64,
    /// Minutes whose first event found its target not ready.
    pub cold_starts: u64,
    /// Minutes the targets ran.
    pub running_minutes: f64,
    /// The median of the targets' cold-start percentages.
    pub cold_start_pct_p50: f64,
    /// Their 75th percentile.
    pub cold_start_pct_p75: f64,
    /// Starts ahead of an expected event.
    pub prewarms: u64,
    /// Pre-warms an event came to.
    pub prewarms_used: u64,
}

/// Runs `policy` on every target of `trace`.
pub fn summarize(trace: &Trace, policy: &str, spec: &PolicySpec, boot: Duration) -> Summary {
    let outcomes: Vec<Outcome> = trace
        .targets
        .iter()
        .map(|t| simulate(&t.arrivals, trace.horizon, spec, boot))
        .collect();
    let mut percentages: Vec<f64> = outcomes
        .iter()
        .map(|o| 100.0 * o.cold_starts as f64 / o.event_minutes.max(1) as f64)
        .collect();
    percentages.sort_by(f64::total_cmp);
    let sum = |f: fn(&Outcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    Summary {
        policy: policy.to_string(),
        targets: outcomes.len(),
        event_minutes: sum(|o| o.event_minutes),
        cold_starts: sum(|o| o.cold_starts),
        running_minutes: outcomes.iter().map(|o| o.running.as_secs_f64()).sum::<f64>() / 60.0,
        cold_start_pct_p50: percentile(&percentages, 0.50),
        cold_start_pct_p75: percentile(&percentages, 0.75),
        prewarms: sum(|o| o.prewarms),
        prewarms_used: sum(|o| o.prewarms_used),
    }
}

/// The `q` quantile of sorted `values`, interpolated between the two nearest ranks.
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = q * (values.len() - 1) as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    values[low] + (values[high] - values[low]) * (rank - low as f64)
}

/// Runs the subcommand: the text to print, or why it could not run.
pub fn run(args: &SimulateArgs) -> Result<String, TraceError> {
    let trace = trace::read(&args.trace)?;
    // One thread per policy: they are independent and the machine has cores to spare.
    let summaries: Vec<Summary> = std::thread::scope(|scope| {
        let runs: Vec<_> = args
            .policies
            .iter()
            .map(|p| scope.spawn(|| summarize(&trace, &p.text, &p.spec, args.boot)))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("a simulation panicked"))
            .collect()
    });
    Ok(if args.json {
        serde_json::to_string_pretty(&summaries).expect("summaries serialize") + "\n"
    } else {
        table(&summaries)
    })
}

/// The summaries as a table, with cold starts and running time relative to the first.
pub fn table(summaries: &[Summary]) -> String {
    let mut out = format!(
        "{:<32} {:>7} {:>10} {:>11} {:>7} {:>12} {:>7} {:>9} {:>9} {:>9}\n",
        "policy",
        "targets",
        "event-min",
        "cold-starts",
        "×cold",
        "running-min",
        "×run",
        "cold%p50",
        "cold%p75",
        "prewarms"
    );
    let first = summaries.first();
    for s in summaries {
        let ratio = |a: f64, b: Option<f64>| b.filter(|b| *b > 0.0).map_or(0.0, |b| a / b);
        out += &format!(
            "{:<32} {:>7} {:>10} {:>11} {:>7.3} {:>12.0} {:>7.3} {:>9.1} {:>9.1} {:>9}\n",
            s.policy,
            s.targets,
            s.event_minutes,
            s.cold_starts,
            ratio(s.cold_starts as f64, first.map(|f| f.cold_starts as f64)),
            s.running_minutes,
            ratio(s.running_minutes, first.map(|f| f.running_minutes)),
            s.cold_start_pct_p50,
            s.cold_start_pct_p75,
            s.prewarms,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_bad_ones_are_named() {
        assert!(
            matches!("fixed:10m".parse::<PolicyArg>().unwrap().spec, PolicySpec::Fixed(d) if d == Duration::from_secs(600))
        );
        let adaptive = "adaptive:bin=1s,range=4m,cold-start-cost=80s,min-keep-alive=1s,max-keep-alive=4m,fallback=10s"
            .parse::<PolicyArg>()
            .unwrap();
        let PolicySpec::Adaptive { settings, fallback } = adaptive.spec else {
            panic!("adaptive");
        };
        assert_eq!((settings.bins(), fallback), (240, Duration::from_secs(10)));
        for (bad, expected) in [
            ("fixed", "fixed:DURATION"),
            ("fixed:soon", "fixed:DURATION"),
            ("lru", "expected fixed"),
            ("adaptive:bin", "KEY=VALUE"),
            ("adaptive:colour=red", "unknown adaptive setting"),
            ("adaptive:bin=1s", "range"),
        ] {
            let error = bad.parse::<PolicyArg>().unwrap_err();
            assert!(error.contains(expected), "{bad}: {error}");
        }
    }

    #[test]
    fn percentiles_interpolate() {
        assert_eq!(percentile(&[0.0, 10.0, 20.0, 30.0], 0.5), 15.0);
        assert_eq!(percentile(&[5.0], 0.75), 5.0);
    }
}
