//! `deploy/monitoring/` proven with real parts: `promtool check rules` and `promtool test
//! rules` (a unit test for every alert), and a real Prometheus scraping two real
//! activators — one through a cold start close to its start timeout, one whose starts
//! fail and that then drains — evaluating every dashboard query and every rule through
//! Prometheus's HTTP API: each must succeed and return series. The answers are written to
//! `target/monitoring-report.md` (docs/operations.md shows them).
//!
//! Needs Debian's `prometheus` package (prometheus and promtool); without it these tests
//! say so and pass, unless `VM_ACTIVATOR_REQUIRE_PROMETHEUS=1` (CI) makes that a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fake_kube::ports::free_port;
use serde_json::Value;
use support::{policy, Harness};
use tokio::time::Instant;
use vm_activator::backend::fake::FakeOptions;
use vm_activator::config::Config;
use vm_activator::vm::{Policy, VmKey};

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring")
}

/// The tool's path, or `None` (after saying why) when the test should be skipped.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let required = std::env::var("VM_ACTIVATOR_REQUIRE_PROMETHEUS").as_deref() == Ok("1");
        assert!(!required, "{name} is not installed (apt-get install prometheus)");
        eprintln!("skipping: {name} is not installed (apt-get install prometheus)");
    }
    found
}

fn yaml(path: &Path) -> Value {
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_prometheus_rule_ships_the_same_groups_as_rules_yaml() {
    let rules = yaml(&monitoring().join("rules.yaml"));
    let operator =
        yaml(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/components/servicemonitor/prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"]["groups"], rules["groups"]);
    let kustomization = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/components/servicemonitor/kustomization.yaml"),
    )
    .unwrap();
    assert!(kustomization.contains("prometheusrule.yaml"));
}

#[test]
fn promtool_checks_the_rules_and_tests_every_alert() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let run = |args: &[&str]| {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(monitoring())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "promtool {args:?}:\n{text}");
        text
    };
    run(&["check", "rules", "rules.yaml"]);
    let tested = run(&["test", "rules", "rules_test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a test case.
    let rules = yaml(&monitoring().join("rules.yaml"));
    let tests = std::fs::read_to_string(monitoring().join("rules_test.yaml")).unwrap();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            if let Some(alert) = rule["alert"].as_str() {
                assert!(tests.contains(&format!("alertname: {alert}")), "no test for {alert}");
            }
        }
    }
}

/// Every expression the dashboard and the rules evaluate, with a name for the report.
fn expressions() -> Vec<(String, String)> {
    let mut all = Vec::new();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", ".*")
                .replace("$vm", ".*")
                .replace("$__rate_interval", "1m");
            all.push((format!("panel: {}", panel["title"].as_str().unwrap()), expr));
        }
    }
    let rules = yaml(&monitoring().join("rules.yaml"));
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let expr = rule["expr"].as_str().unwrap().trim().to_string();
            if let Some(record) = rule["record"].as_str() {
                all.push((format!("recording rule {record} (its series)"), record.to_string()));
                all.push((format!("recording rule {record} (its expression)"), expr));
            } else {
                let alert = rule["alert"].as_str().unwrap();
                all.push((format!("alert {alert}"), expr));
            }
        }
    }
    all
}

/// Kills Prometheus when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_rule_expression_returns_series_from_a_real_prometheus() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    // A: cold starts of 1.7 s against a 2 s start timeout. B: every start fails.
    let slow = Harness::start(
        Policy {
            start_timeout: Duration::from_secs(2),
            ..policy()
        },
        FakeOptions {
            boot_delay: Duration::from_millis(1700),
            ..FakeOptions::default()
        },
    )
    .await;
    let broken = Harness::start_with(
        vec![(VmKey::new("default", "broken"), policy())],
        FakeOptions {
            start_error: Some("no capacity left on the node".into()),
            ..FakeOptions::default()
        },
        Config::for_tests(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let target = |h: &Harness| h.admin.trim_start_matches("http://").to_string();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: vm-activator\n    static_configs:\n      - targets: ['{}', '{}']\n",
        monitoring().join("rules.yaml").display(),
        target(&slow),
        target(&broken),
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = Running(
        Command::new(prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let query = |expr: String| {
        let request = client.get(&api).query(&[("query", expr)]);
        async move {
            let Ok(response) = request.send().await else {
                return Err("Prometheus is not answering".to_string());
            };
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            if body["status"] != "success" {
                return Err(format!("{}: {}", body["errorType"], body["error"]));
            }
            Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
        }
    };
    let wait_for = |expr: &str, limit: Duration| {
        let expr = expr.to_string();
        let query = &query;
        async move {
            let deadline = Instant::now() + limit;
            loop {
                match query(expr.clone()).await {
                    Ok(result) if !result.is_empty() => return Ok(result),
                    Ok(_) if Instant::now() > deadline => return Err("no series".to_string()),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    _ => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        }
    };
    wait_for("count(up == 1) == 2", Duration::from_secs(30))
        .await
        .expect("Prometheus scrapes both activators");

    // A cold start, then warm events; starts that fail, one at a time across scrapes.
    assert_eq!(slow.send("/default/demo", "cold").await.status(), 202);
    for i in 0..3 {
        assert_eq!(
            broken.send("/default/broken", &format!("fails-{i}")).await.status(),
            503
        );
        assert_eq!(slow.send("/default/demo", &format!("warm-{i}")).await.status(), 202);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // B drains: not ready.
    broken.server.activator.start_draining();

    let mut report = String::from("| what | query | series | e.g. |\n|---|---|---:|---|\n");
    let mut failures = Vec::new();
    for (what, expr) in expressions() {
        match wait_for(&expr, Duration::from_secs(30)).await {
            Ok(result) => {
                // The most telling series: one with a number, not NaN or 0.
                let first = result
                    .iter()
                    .find(|r| r["value"][1].as_str().is_some_and(|v| v != "NaN" && v != "0"))
                    .unwrap_or(&result[0]);
                let example = format!("{} = {}", first["metric"], first["value"][1]);
                report.push_str(&format!(
                    "| {what} | `{}` | {} | `{}` |\n",
                    expr.replace('\n', " ").replace('|', "\\|"),
                    result.len(),
                    example.replace('|', "\\|")
                ));
            }
            Err(e) => failures.push(format!("{what}: {expr}: {e}")),
        }
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/monitoring-report.md");
    let _ = std::fs::write(&out, &report);
    eprintln!("{report}");
    assert!(failures.is_empty(), "expressions that failed:\n{}", failures.join("\n"));
}
