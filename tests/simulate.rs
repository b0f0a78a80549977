//! `vm-activator simulate` through the binary: its errors (a trace line that does not
//! parse is named, a run without `--policy` is refused), its JSON, and the adaptive
//! policy's claim on the shared production trace (`../shared/traces`): at most half the
//! cold starts of a 10-minute idle timeout, with no more running time.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn simulate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vm-activator"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("the binary runs")
}

fn trace_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("trace.csv");
    std::fs::write(&path, text).unwrap();
    path
}

fn json(output: &Output) -> Vec<Value> {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

#[test]
fn a_trace_line_that_does_not_parse_is_named_and_a_policy_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let bad = trace_file(dir.path(), "target,unix_seconds\na,100\nb,soon\n");
    let out = simulate(&["--trace", bad.to_str().unwrap(), "--policy", "fixed:10m"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("trace line 3") && stderr.contains("soon"), "{stderr}");

    let good = trace_file(dir.path(), "a,100\n");
    let out = simulate(&["--trace", good.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy"));

    let out = simulate(&["--trace", good.to_str().unwrap(), "--policy", "adaptive:colour=red"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));

    let out = simulate(&["--trace", "/nonexistent/trace.csv", "--policy", "fixed:1m"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/trace.csv"));
}

#[test]
fn json_has_one_object_per_policy_in_the_order_given() {
    let dir = tempfile::tempdir().unwrap();
    // One target with an event every 20 minutes for a day, in Unix seconds.
    let lines: String = (0..72)
        .map(|i| format!("cron,{}\n", 1_764_000_000 + i * 1200))
        .collect();
    let trace = trace_file(dir.path(), &lines);
    let out = simulate(&[
        "--trace",
        trace.to_str().unwrap(),
        "--policy",
        "fixed:10m",
        "--policy",
        "adaptive",
        "--boot",
        "1m",
        "--json",
    ]);
    let summaries = json(&out);
    assert_eq!(summaries.len(), 2);
    assert_eq!(summaries[0]["policy"], "fixed:10m");
    assert_eq!(summaries[1]["policy"], "adaptive");
    for s in &summaries {
        assert_eq!(s["targets"], 1);
        assert_eq!(s["event_minutes"], 72);
        for key in [
            "cold_starts",
            "running_minutes",
            "cold_start_pct_p50",
            "cold_start_pct_p75",
        ] {
            assert!(s[key].is_number(), "{key}: {s}");
        }
    }
    assert_eq!(
        summaries[0]["cold_starts"], 72,
        "a 10-minute timeout never sees the next event"
    );
    let adaptive_cold = summaries[1]["cold_starts"].as_u64().unwrap();
    assert!(adaptive_cold <= 6, "learned the 20-minute period: {}", summaries[1]);
    assert!(summaries[1]["running_minutes"].as_f64() < summaries[0]["running_minutes"].as_f64());
}

#[test]
fn on_the_production_trace_adaptive_halves_the_cold_starts_of_a_ten_minute_timeout_for_no_more_running() {
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/traces/azure-functions-2019-day1-525.csv");
    if !trace.is_file() {
        eprintln!("skipped: the production trace {} is missing", trace.display());
        return;
    }
    let out = simulate(&[
        "--trace",
        trace.to_str().unwrap(),
        "--boot",
        "1m",
        "--policy",
        "fixed:10m",
        "--policy",
        "adaptive",
        "--json",
    ]);
    let summaries = json(&out);
    let (fixed, adaptive) = (&summaries[0], &summaries[1]);
    let ratio = |key: &str| adaptive[key].as_f64().unwrap() / fixed[key].as_f64().unwrap();
    eprintln!(
        "adaptive: {:.3} × the cold starts, {:.3} × the running minutes of fixed:10m",
        ratio("cold_starts"),
        ratio("running_minutes")
    );
    assert_eq!(fixed["targets"], 525);
    assert!(ratio("cold_starts") <= 0.5, "{adaptive} vs {fixed}");
    assert!(ratio("running_minutes") <= 1.0, "{adaptive} vs {fixed}");
}
