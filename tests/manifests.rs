//! Every manifest under deploy/ parses; the kustomize base has the kinds and wiring a
//! cluster operator relies on; RBAC grants exactly what the KubeVirt backend uses; the
//! examples agree with the activator's contract (annotations, subscriber URI).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use vm_activator::backend::kubevirt::{scale_kind_access, API_ACCESS, PAUSE_API_ACCESS};
use vm_activator::config::{BackendKind, Config};
use vm_activator::vm::{Policy, OPT_IN_LABEL};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        // deploy/monitoring holds Prometheus rule files, not Kubernetes objects
        // (tests/monitoring.rs checks them with promtool and a real Prometheus).
        if path.ends_with("monitoring") {
            continue;
        }
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The base's objects, from the files its kustomization lists.
fn base() -> Vec<Value> {
    let kustomization = &docs(&deploy().join("base/kustomization.yaml"))[0];
    kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| docs(&deploy().join("base").join(r.as_str().unwrap())))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

type Access = BTreeMap<(String, String), BTreeSet<String>>;

fn granted(role: &Value) -> Access {
    let mut access = Access::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                let verbs = access
                    .entry((group.as_str().unwrap().into(), resource.as_str().unwrap().into()))
                    .or_default();
                verbs.extend(
                    rule["verbs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_str().unwrap().to_string()),
                );
            }
        }
    }
    access
}

fn declared(access: &[(&str, &str, &[&str])]) -> Access {
    access
        .iter()
        .map(|(g, r, verbs)| {
            (
                (g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

#[test]
fn every_manifest_parses_and_names_itself() {
    let files = yaml_files(&deploy());
    assert!(files.len() >= 12, "{files:?}");
    for file in files {
        for doc in docs(&file) {
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", file.display()));
            assert!(doc["apiVersion"].is_string(), "{}: no apiVersion", file.display());
            if !matches!(kind, "Kustomization" | "Component") {
                assert!(
                    doc["metadata"]["name"].is_string(),
                    "{}: {kind} without a name",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn the_base_has_what_a_deployment_needs() {
    let objects = base();
    let kinds: BTreeSet<_> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    let expected: BTreeSet<_> = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ]
    .into();
    assert_eq!(kinds, expected);

    let deployment = find(&objects, "Deployment", "vm-activator");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "vm-activator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["requests"]["memory"].is_string());
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *pod_labels);

    // The container runs the ConfigMap's config, which is valid and selects KubeVirt.
    let config_map = find(&objects, "ConfigMap", "vm-activator");
    let config = Config::from_yaml(config_map["data"]["config.yaml"].as_str().unwrap()).unwrap();
    config.validate().unwrap();
    assert_eq!(config.backend, BackendKind::Kubevirt);
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(container["args"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == &format!("--config={mount}/config.yaml")));
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() > config.drain_timeout.as_secs(),
        "the pod must outlive the drain"
    );
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(port("http"), u64::from(config.listen.port()));
    assert_eq!(port("admin"), u64::from(config.admin_listen.port()));

    let service = find(&objects, "Service", "vm-activator");
    assert_eq!(service["spec"]["ports"][0]["port"], 80);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    assert_eq!(service["spec"]["selector"], *pod_labels);
    let pdb = find(&objects, "PodDisruptionBudget", "vm-activator");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *pod_labels);
}

#[test]
fn rbac_grants_exactly_what_the_backend_uses() {
    let objects = base();
    let role = find(&objects, "ClusterRole", "vm-activator");
    assert_eq!(granted(role), declared(API_ACCESS));
    let binding = find(&objects, "ClusterRoleBinding", "vm-activator");
    assert_eq!(binding["roleRef"]["name"], "vm-activator");
    assert_eq!(binding["subjects"][0]["name"], "vm-activator");
    assert_eq!(binding["subjects"][0]["namespace"], "vm-activator");

    let pause = docs(&deploy().join("components/pause/rbac.yaml"));
    assert_eq!(
        granted(find(&pause, "ClusterRole", "vm-activator-pause")),
        declared(PAUSE_API_ACCESS)
    );

    let pools = docs(&deploy().join("components/virtualmachinepools/rbac.yaml"));
    let needed = scale_kind_access("pool.kubevirt.io", "virtualmachinepools");
    let needed: Vec<(&str, &str, &[&str])> = needed.iter().map(|(g, r, v)| (*g, r.as_str(), *v)).collect();
    assert_eq!(
        granted(find(&pools, "ClusterRole", "vm-activator-virtualmachinepools")),
        declared(&needed)
    );
}

/// Each component's config is valid and keeps what the base sets.
#[test]
fn the_components_configs_are_valid() {
    for (component, check) in [
        (
            "pause",
            Box::new(|c: &Config| c.kubevirt.pause) as Box<dyn Fn(&Config) -> bool>,
        ),
        (
            "virtualmachinepools",
            Box::new(|c: &Config| c.kubevirt.scale_kinds.iter().any(|k| k.kind == "VirtualMachinePool")),
        ),
    ] {
        let kustomization = &docs(&deploy().join(format!("components/{component}/kustomization.yaml")))[0];
        let patch: Vec<Value> = serde_norway::from_str(kustomization["patches"][0]["patch"].as_str().unwrap()).unwrap();
        let config = Config::from_yaml(patch[0]["value"].as_str().unwrap()).unwrap();
        config.validate().unwrap();
        assert!(config.kubevirt.workloads, "{component}");
        assert!(check(&config), "{component}");
    }
}

/// The traces component adds the standard OTEL_* variables to the container, after
/// POD_NAME (which its resource attributes expand), and they turn traces on.
#[test]
fn the_otlp_component_turns_traces_on() {
    use vm_activator::telemetry::{OtlpSettings, Protocol};
    let kustomization = &docs(&deploy().join("components/otlp/kustomization.yaml"))[0];
    assert_eq!(kustomization["patches"][0]["target"]["kind"], "Deployment");
    let ops: Vec<Value> = serde_norway::from_str(kustomization["patches"][0]["patch"].as_str().unwrap()).unwrap();
    let env: Vec<(String, String)> = ops
        .iter()
        .map(|op| {
            assert_eq!(op["path"], "/spec/template/spec/containers/0/env/-");
            let value = &op["value"];
            (
                value["name"].as_str().unwrap().to_string(),
                value["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let settings = OtlpSettings::from_env(|name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
        .unwrap()
        .expect("traces on");
    assert_eq!(settings.protocol, Protocol::HttpProtobuf);
    let deployment = docs(&deploy().join("base/deployment.yaml"));
    let deployment = find(&deployment, "Deployment", "vm-activator");
    let base_env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(base_env.iter().any(|e| e["name"] == "POD_NAME"));
}

/// Every workload example: opted in, at zero, settings without warnings, and fed by a
/// Trigger whose subscriber is the activator at `/{namespace}/{name}`.
#[test]
fn each_workload_example_is_fed_by_a_trigger() {
    for (file, kind, name) in [
        ("kata-deployment.yaml", "Deployment", "invoice-renderer"),
        ("statefulset.yaml", "StatefulSet", "ledger"),
        ("multus-vm.yaml", "VirtualMachine", "scada-gateway"),
    ] {
        let objects = docs(&deploy().join("examples").join(file));
        let target = find(&objects, kind, name);
        assert_eq!(target["metadata"]["labels"][OPT_IN_LABEL], "true", "{file}");
        let annotations = target["metadata"]["annotations"].as_object().unwrap();
        let policy = Policy::from_annotations(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap())));
        assert!(policy.warnings.is_empty(), "{file}: {:?}", policy.warnings);
        match kind {
            "VirtualMachine" => assert_eq!(target["spec"]["runStrategy"], "Halted"),
            _ => assert_eq!(target["spec"]["replicas"], 0, "{file}"),
        }
        let trigger = objects.iter().find(|o| o["kind"] == "Trigger").expect("a Trigger");
        let namespace = target["metadata"]["namespace"].as_str().unwrap();
        assert_eq!(trigger["metadata"]["namespace"], namespace);
        let subscriber = &trigger["spec"]["subscriber"];
        assert_eq!(subscriber["ref"]["name"], "vm-activator");
        assert_eq!(subscriber["uri"], format!("/{namespace}/{name}").as_str(), "{file}");
    }
    let kata = docs(&deploy().join("examples/kata-deployment.yaml"));
    let pod = &find(&kata, "Deployment", "invoice-renderer")["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "kata-qemu");

    // The Multus VM: the annotation names a network the VM has an interface on.
    let multus = docs(&deploy().join("examples/multus-vm.yaml"));
    let vm = find(&multus, "VirtualMachine", "scada-gateway");
    let network = vm["metadata"]["annotations"]["vm-activator.io/network"]
        .as_str()
        .unwrap();
    let networks = vm["spec"]["template"]["spec"]["networks"].as_array().unwrap();
    assert!(networks.iter().any(|n| n["multus"]["networkName"] == network));
    find(&multus, "NetworkAttachmentDefinition", network);
}

#[test]
fn the_service_monitor_scrapes_the_admin_service() {
    let monitor = &docs(&deploy().join("components/servicemonitor/servicemonitor.yaml"))[0];
    let objects = base();
    let admin = find(&objects, "Service", "vm-activator-admin");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        let from_kustomize = k == "app.kubernetes.io/name";
        assert!(
            from_kustomize || admin["metadata"]["labels"][k] == *v,
            "admin Service lacks label {k}"
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        admin["spec"]["ports"][0]["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}

#[test]
fn the_examples_match_the_activator_contract() {
    let vm = &docs(&deploy().join("examples/virtualmachine.yaml"))[0];
    assert_eq!(vm["metadata"]["labels"][OPT_IN_LABEL], "true");
    let annotations = vm["metadata"]["annotations"].as_object().unwrap();
    let policy = Policy::from_annotations(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap())));
    assert!(policy.warnings.is_empty(), "{:?}", policy.warnings);
    assert_eq!(annotations.len(), 9, "every per-VM setting is shown");
    assert!(vm["spec"]["template"]["spec"]["readinessProbe"].is_object());

    let knative = docs(&deploy().join("examples/knative.yaml"));
    let trigger = find(&knative, "Trigger", "orders-to-legacy");
    let subscriber = &trigger["spec"]["subscriber"];
    assert_eq!(subscriber["ref"]["kind"], "Service");
    assert_eq!(subscriber["ref"]["name"], "vm-activator");
    assert_eq!(subscriber["ref"]["namespace"], "vm-activator");
    let uri = format!(
        "/{}/{}",
        vm["metadata"]["namespace"].as_str().unwrap(),
        vm["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(subscriber["uri"], uri.as_str());
    let delivery = &trigger["spec"]["delivery"];
    assert!(delivery["retry"].as_u64().unwrap() >= 3);
    assert_eq!(delivery["backoffPolicy"], "exponential");
    assert!(delivery["deadLetterSink"]["ref"].is_object());
    assert_eq!(
        trigger["spec"]["broker"],
        find(&knative, "Broker", "default")["metadata"]["name"]
    );
}

#[test]
fn the_dockerfile_is_multi_stage_and_non_root() {
    let text = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2);
    assert!(text.contains("USER 65532"));
    assert!(text.contains("--bin vm-activator"));
    // The stripped dist build, not the release build that keeps debug info for profiling.
    assert!(text.contains("--profile dist") && text.contains("target/dist/vm-activator"));
    let manifest = std::fs::read_to_string(deploy().join("../Cargo.toml")).unwrap();
    assert!(manifest.contains("[profile.dist]") && manifest.contains("strip = true"));
    // The build script's link options (packed relocations) must reach the image's binary.
    assert!(
        text.lines().any(|l| l.starts_with("COPY ") && l.contains("build.rs")),
        "the Dockerfile does not copy build.rs"
    );
}
