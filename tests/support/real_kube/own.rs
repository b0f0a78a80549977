//! A real cluster of one test's own — its own run directory and ports — for a scenario
//! that stops the API server, which the cluster the other scenarios share must never
//! have done to it. Stopped (and its etcd data removed) when dropped.

use std::path::PathBuf;
use std::process::Command;

use super::{bundle, in_ci};

/// A cluster started with `up.sh` in `target/<name>`.
pub struct OwnCluster {
    bundle: PathBuf,
    dir: PathBuf,
    ports: [u16; 4],
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
}

impl OwnCluster {
    /// Starts it with kube-apiserver on `base_port`, etcd on the next two and the
    /// controller-manager on the one after (a few seconds; half a minute on a loaded
    /// machine). `None` where the bundle is absent (a failure in CI).
    pub async fn start(name: &str, base_port: u16) -> Option<OwnCluster> {
        let Some(bundle) = bundle() else {
            assert!(
                !in_ci(),
                "CI must run the real-API-server tests: no bundle at ../shared/k8s"
            );
            let test = std::thread::current().name().unwrap_or("this test").to_string();
            eprintln!("skipped: {test} needs the Kubernetes test bundle (../shared/k8s/up.sh)");
            return None;
        };
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join(name);
        let cluster = OwnCluster {
            bundle,
            kubeconfig: dir.join("kubeconfig"),
            dir,
            ports: [base_port, base_port + 1, base_port + 2, base_port + 3],
        };
        cluster.up().await;
        Some(cluster)
    }

    /// Runs `up.sh` (which starts whatever is not running, from an empty etcd).
    pub async fn up(&self) {
        let mut command = Command::new(self.bundle.join("up.sh"));
        command
            .arg(&self.dir)
            .env("K8S_APISERVER_PORT", self.ports[0].to_string())
            .env("K8S_ETCD_PORT", self.ports[1].to_string())
            .env("K8S_ETCD_PEER_PORT", self.ports[2].to_string())
            .env("K8S_KCM_PORT", self.ports[3].to_string());
        let out = tokio::task::spawn_blocking(move || command.output().expect("up.sh runs"))
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "up.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates an opted-in, halted VirtualMachine in `default` with these annotations.
    pub async fn create_opted_in_vm(&self, name: &str, annotations: serde_json::Value) {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("admin kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("admin config");
        let client = kube::Client::try_from(config).expect("client");
        let vm = serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "labels": {"vm-activator.io/enabled": "true"}, "annotations": annotations},
            "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {"devices": {}}}}},
        });
        super::post(&client, "/apis/kubevirt.io/v1/namespaces/default/virtualmachines", vm).await;
    }

    /// Sends kube-apiserver SIGTERM, as a control-plane rolling upgrade does.
    pub fn sigterm_apiserver(&self) {
        let pid = std::fs::read_to_string(self.dir.join("run/kube-apiserver.pid")).expect("the apiserver's pid");
        let pid: i32 = pid.trim().parse().expect("a pid");
        // SAFETY: kill(2) with a pid up.sh recorded for this run directory.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to kube-apiserver {pid}");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(self.bundle.join("down.sh")).arg(&self.dir).output();
    }
}
