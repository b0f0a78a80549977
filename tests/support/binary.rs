//! The real `vm-activator` binary as a child process on free loopback ports.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_kube::ports::free_port;
use tokio::time::Instant;

/// A running activator process. Killed on drop (its QEMU children die with it).
pub struct Activator {
    pub child: Child,
    pub ingress: String,
    pub admin: String,
    /// Its stderr lines, when started with [`Activator::spawn_with_env`].
    pub logs: Option<Arc<Mutex<Vec<String>>>>,
    client: reqwest::Client,
}

impl Drop for Activator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Activator {
    /// Starts the binary with `args` plus `--listen`/`--admin-listen` on free ports and
    /// waits for `/healthz`.
    pub async fn spawn(args: &[&str]) -> Activator {
        Activator::start(args, &[], false).await
    }

    /// As [`Activator::spawn`], with these environment variables set, keeping its stderr
    /// lines in `logs` (and copying them to the test's stderr).
    pub async fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Activator {
        Activator::start(args, env, true).await
    }

    /// As [`Activator::spawn`], run as `launcher[0] launcher[1..] args…` instead of the
    /// test build's binary: e.g. the image's entrypoint inside its root filesystem.
    pub async fn spawn_via(launcher: &[String], args: &[&str]) -> Activator {
        let (program, pre) = launcher.split_first().expect("a launcher program");
        Activator::start_program(program, pre, args, &[], false).await
    }

    async fn start(args: &[&str], env: &[(&str, &str)], keep_logs: bool) -> Activator {
        Activator::start_program(env!("CARGO_BIN_EXE_vm-activator"), &[], args, env, keep_logs).await
    }

    async fn start_program(
        program: &str,
        pre: &[String],
        args: &[&str],
        env: &[(&str, &str)],
        keep_logs: bool,
    ) -> Activator {
        let (ingress, admin) = (free_port(), free_port());
        let mut child = Command::new(program)
            .args(pre)
            .args(args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{ingress}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin}"))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .stderr(if keep_logs { Stdio::piped() } else { Stdio::inherit() })
            .spawn()
            .expect("the binary runs");
        let logs = child.stderr.take().map(|stderr| {
            let logs = Arc::new(Mutex::new(Vec::new()));
            let kept = logs.clone();
            std::thread::spawn(move || {
                for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
                    eprintln!("{line}");
                    kept.lock().unwrap().push(line);
                }
            });
            logs
        });
        let activator = Activator {
            child,
            ingress: format!("http://127.0.0.1:{ingress}"),
            admin: format!("http://127.0.0.1:{admin}"),
            logs,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .unwrap(),
        };
        // Generous: on a loaded 2-core machine a dozen processes may be starting at once.
        let deadline = Instant::now() + Duration::from_secs(30);
        while activator.get_status("/healthz").await != 200 {
            assert!(Instant::now() < deadline, "activator did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        activator
    }

    /// Starts the binary with `--backend kubevirt`, this kubeconfig, no ingress
    /// authentication, and `extra` flags.
    pub async fn spawn_kubevirt(kubeconfig: &std::path::Path, extra: &[&str]) -> Activator {
        let mut args = vec![
            "--backend",
            "kubevirt",
            "--kubeconfig",
            kubeconfig.to_str().expect("a UTF-8 path"),
            "--auth",
            "none",
        ];
        args.extend_from_slice(extra);
        Activator::spawn(&args).await
    }

    /// Status of `GET {admin}{path}`, or 0 if the request failed.
    pub async fn get_status(&self, path: &str) -> u16 {
        match self.client.get(format!("{}{path}", self.admin)).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Polls `GET {admin}{path}` until it answers `status`; panics after `limit`.
    pub async fn wait_status(&self, path: &str, status: u16, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.get_status(path).await;
            if now == status {
                return;
            }
            assert!(Instant::now() < deadline, "{path} answered {now}, expected {status}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// POSTs a binary-mode CloudEvent; returns the response.
    pub async fn send(&self, path: &str, id: &str) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.ingress))
            .header("ce-specversion", "1.0")
            .header("ce-id", id)
            .header("ce-source", "/e2e")
            .header("ce-type", "e2e.event")
            .header("content-type", "application/json")
            .body(format!("{{\"id\":\"{id}\"}}"))
            .send()
            .await
            .expect("request completes")
    }

    /// POSTs and returns just the status (0 if the request failed).
    pub async fn send_status(&self, path: &str, id: &str) -> u16 {
        self.send(path, id).await.status().as_u16()
    }

    /// `/v1/vms` as JSON.
    pub async fn vms(&self) -> serde_json::Value {
        serde_json::from_str(&super::admin_text(&self.client, &self.admin, "/v1/vms").await).unwrap()
    }

    /// The `/v1/vms` entry of one VM, if listed.
    pub async fn vm(&self, namespace: &str, name: &str) -> Option<serde_json::Value> {
        self.vms()
            .await
            .as_array()?
            .iter()
            .find(|v| v["namespace"] == namespace && v["name"] == name)
            .cloned()
    }

    /// Polls until the VM is listed in `state`; panics after `limit`.
    pub async fn wait_vm_state(&self, namespace: &str, name: &str, state: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let vm = self.vm(namespace, name).await;
            if vm.as_ref().is_some_and(|v| v["state"] == state) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{namespace}/{name} is {vm:?}, expected {state}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The value of one exact series in `/metrics`, or 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        super::metric_value(&super::admin_text(&self.client, &self.admin, "/metrics").await, series)
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
