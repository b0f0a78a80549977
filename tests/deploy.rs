//! Every manifest under `deploy/` is accepted by the real kube-apiserver of
//! `../shared/k8s` (KubeVirt's, Knative Eventing's and Multus's CRDs installed): the
//! kustomize base alone and with each component (rendered by `kubectl kustomize`, the
//! kustomize users run), and every example, applied with a server-side dry run — the
//! server's validation, defaulting, admission and CRD schemas, nothing stored.
//!
//! The Prometheus Operator's CRDs are not in the bundle: for the `servicemonitor`
//! component the test installs stand-ins for `ServiceMonitor` and `PrometheusRule` that
//! accept any spec, so those two objects are checked for group, version, kind, namespace
//! and name only (tests/manifests.rs checks their content, tests/monitoring.rs the rules
//! with promtool).
//!
//! Skipped with a message without the bundle or `kubectl` (CI=true makes either a failure).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// `kubectl` against the test cluster as its admin; stdout, or the failure with stderr.
fn kubectl(env: &support::real_kube::Env, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", env.dir.join("kubeconfig"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("kubectl: {e}"))?;
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or("").as_bytes()).expect("stdin written");
    drop(input);
    let out = child.wait_with_output().expect("kubectl ran");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    match out.status.success() {
        true => Ok(text),
        false => Err(format!(
            "kubectl {}: {}\n{text}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("YAML"))
        .filter(|doc: &Value| !doc.is_null())
        .collect()
}

/// The base with `component` (or alone), rendered by kustomize from a kustomization in
/// `target/kustomize/` that refers to them.
fn render(env: &support::real_kube::Env, component: Option<&str>) -> String {
    let dir = repo().join(format!("target/kustomize/{}", component.unwrap_or("base")));
    std::fs::create_dir_all(&dir).unwrap();
    let components = component
        .map(|c| format!("components:\n  - ../../../deploy/components/{c}\n"))
        .unwrap_or_default();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../../deploy/base\n{components}"
        ),
    )
    .unwrap();
    kubectl(env, &["kustomize", dir.to_str().unwrap()], None).unwrap_or_else(|e| panic!("{e}"))
}

/// Stand-ins for the Prometheus Operator's CRDs (any spec accepted).
fn prometheus_operator_stand_ins(env: &support::real_kube::Env) {
    for (kind, plural) in [
        ("ServiceMonitor", "servicemonitors"),
        ("PrometheusRule", "prometheusrules"),
    ] {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com", "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
            },
        });
        kubectl(env, &["apply", "--server-side", "-f", "-"], Some(&crd.to_string())).unwrap_or_else(|e| panic!("{e}"));
    }
    kubectl(
        env,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Applies `yaml` with a server-side dry run after creating (for real) the namespaces
/// its objects live in; returns what the server said per object.
fn dry_run(env: &support::real_kube::Env, what: &str, yaml: &str) -> Vec<String> {
    let objects = documents(yaml);
    assert!(!objects.is_empty(), "{what}: no objects");
    for namespace in objects.iter().filter_map(|o| o["metadata"]["namespace"].as_str()) {
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        kubectl(env, &["apply", "--server-side", "-f", "-"], Some(&ns.to_string())).unwrap_or_else(|e| panic!("{e}"));
    }
    let out = kubectl(
        env,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=vm-activator-deploy-test",
            "-f",
            "-",
        ],
        Some(yaml),
    )
    .unwrap_or_else(|e| panic!("{what}: the API server refused it:\n{e}"));
    let lines: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), objects.len(), "{what}: one answer per object\n{out}");
    assert!(
        lines.iter().all(|l| l.ends_with("(server dry run)")),
        "{what}: every object applied in a server dry run:\n{out}"
    );
    lines
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn every_manifest_is_accepted_by_the_real_api_server_in_a_dry_run() {
    let Some(env) = support::real_kube::env() else {
        eprintln!("skipped: needs the Kubernetes test bundle (../shared/k8s/up.sh)");
        return;
    };
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        assert!(!in_ci(), "CI must have kubectl (it renders the kustomizations)");
        eprintln!("skipped: needs kubectl (kustomize and server-side dry runs)");
        return;
    }
    prometheus_operator_stand_ins(env);
    let mut applied = Vec::new();
    let base = render(env, None);
    applied.push(("deploy/base".to_string(), dry_run(env, "deploy/base", &base)));
    let mut components: Vec<String> = std::fs::read_dir(repo().join("deploy/components"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    components.sort();
    assert!(components.len() >= 4, "{components:?}");
    for component in &components {
        let what = format!("deploy/base + components/{component}");
        let rendered = render(env, Some(component));
        assert_ne!(rendered, base, "{what}: the component changes the base");
        applied.push((what.clone(), dry_run(env, &what, &rendered)));
    }
    for file in yaml_files(&repo().join("deploy/examples")) {
        let what = file.strip_prefix(repo()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        applied.push((what.clone(), dry_run(env, &what, &text)));
    }
    // The monitoring rules are a PrometheusRule's spec as well (the component ships them).
    let rules: Value =
        serde_norway::from_str(&std::fs::read_to_string(repo().join("deploy/monitoring/rules.yaml")).unwrap()).unwrap();
    let rule = json!({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
        "metadata": {"name": "vm-activator-rules-file", "namespace": "vm-activator"},
        "spec": rules,
    });
    applied.push((
        "deploy/monitoring/rules.yaml".into(),
        dry_run(env, "deploy/monitoring/rules.yaml", &rule.to_string()),
    ));
    for (what, lines) in &applied {
        println!("{what}: {} object(s) accepted", lines.len());
    }
    // The base, each of the 4 components, each of the 5 examples, the rules file.
    assert!(applied.len() >= 11, "{}", applied.len());
}
