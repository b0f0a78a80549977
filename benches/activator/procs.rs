//! The processes a benchmark runs beside itself — the real `vm-activator` binary and
//! nginx — plus what it reads about them: RSS from `/proc`, metrics and `/v1/vms` from
//! the admin port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A free port on 127.0.0.1 for a child process to bind, below the ephemeral range
/// (see `fake_kube::ports`).
pub use fake_kube::ports::free_port;

/// `GET url` → (status, body); status 0 when the request failed.
pub async fn get(url: &str) -> (u16, String) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let Ok(uri) = url.parse() else {
        return (0, String::new());
    };
    match tokio::time::timeout(Duration::from_secs(30), client.get(uri)).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        _ => (0, String::new()),
    }
}

/// Resident and peak resident memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// VmRSS in KiB.
    pub rss_kib: u64,
    /// VmHWM (peak RSS since start or since the last `reset_peak`) in KiB.
    pub peak_kib: u64,
    /// RssFile in KiB: the part of the RSS that is mapped files — the executable's code,
    /// above all — not memory the process allocated.
    pub file_kib: u64,
}

/// Reads `/proc/<pid>/status`.
pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
        file_kib: field("RssFile:"),
    }
}

/// Resets VmHWM to the current RSS (`echo 5 > /proc/<pid>/clear_refs`).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// The real binary, killed on drop.
pub struct ActivatorProcess {
    child: Child,
    /// Ingress address.
    pub ingress: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
}

impl ActivatorProcess {
    /// Starts `vm-activator` with `args` plus `--listen`/`--admin-listen` on free ports;
    /// waits for `/healthz`.
    pub async fn spawn(args: &[String]) -> ActivatorProcess {
        // BENCH_ACTIVATOR_WRAPPER runs the binary under a profiler, e.g.
        // "valgrind --tool=massif --massif-out-file=/tmp/massif.out".
        let wrapper = std::env::var("BENCH_ACTIVATOR_WRAPPER").unwrap_or_default();
        Self::spawn_under(&wrapper, args).await
    }

    /// As [`ActivatorProcess::spawn`], the binary run by `wrapper` (a command line, e.g.
    /// `valgrind --tool=callgrind`; empty for none).
    pub async fn spawn_under(wrapper: &str, args: &[String]) -> ActivatorProcess {
        Self::spawn_with_env(wrapper, args, &[]).await
    }

    /// As [`ActivatorProcess::spawn_under`], with these environment variables set.
    pub async fn spawn_with_env(wrapper: &str, args: &[String], env: &[(&str, &str)]) -> ActivatorProcess {
        let ingress: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut command: Vec<String> = wrapper.split_whitespace().map(str::to_string).collect();
        command.push(env!("CARGO_BIN_EXE_vm-activator").to_string());
        let child = Command::new(&command[0])
            .args(&command[1..])
            .args(args)
            .arg("--listen")
            .arg(ingress.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .env(
                "RUST_LOG",
                std::env::var("BENCH_ACTIVATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the vm-activator binary runs");
        let process = ActivatorProcess { child, ingress, admin };
        let deadline = Instant::now() + Duration::from_secs(60);
        while process.admin_get("/healthz").await.0 != 200 {
            assert!(Instant::now() < deadline, "vm-activator did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        process
    }

    /// Starts the binary with the KubeVirt backend against a fake API server, with no
    /// ingress authentication and `config` (YAML) for anything else.
    pub async fn kubevirt(kubeconfig: &Path, dir: &Path, config: &str) -> ActivatorProcess {
        let wrapper = std::env::var("BENCH_ACTIVATOR_WRAPPER").unwrap_or_default();
        Self::kubevirt_under(&wrapper, kubeconfig, dir, config).await
    }

    /// As [`ActivatorProcess::kubevirt`], run by `wrapper`.
    pub async fn kubevirt_under(wrapper: &str, kubeconfig: &Path, dir: &Path, config: &str) -> ActivatorProcess {
        Self::kubevirt_with_env(wrapper, kubeconfig, dir, config, &[]).await
    }

    /// As [`ActivatorProcess::kubevirt_under`], with these environment variables set.
    pub async fn kubevirt_with_env(
        wrapper: &str,
        kubeconfig: &Path,
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> ActivatorProcess {
        let file = dir.join(format!("activator-{}.yaml", free_port()));
        std::fs::write(&file, format!("backend: kubevirt\n{config}")).expect("write config");
        Self::spawn_with_env(
            wrapper,
            &[
                "--config".into(),
                file.display().to_string(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--auth".into(),
                "none".into(),
            ],
            env,
        )
        .await
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// `GET` on the admin port.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        get(&format!("http://{}{path}", self.admin)).await
    }

    /// The value of the sample of `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            if !series.is_empty() && !series.starts_with('{') {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse().ok())?
        })
    }

    /// How many VMs `/v1/vms` lists.
    pub async fn vm_count(&self) -> usize {
        let (_, text) = self.admin_get("/v1/vms").await;
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }

    /// Waits until `/v1/vms` lists at least `n` VMs.
    pub async fn wait_vms(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.vm_count().await < n {
            assert!(Instant::now() < deadline, "the activator did not list {n} VMs");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The `state` `/v1/vms` shows for one VM.
    pub async fn vm_state(&self, namespace: &str, name: &str) -> String {
        let (_, text) = self.admin_get("/v1/vms").await;
        let vms: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        vms.as_array()
            .into_iter()
            .flatten()
            .find(|v| v["namespace"] == namespace && v["name"] == name)
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Memory now.
    pub fn memory(&self) -> Memory {
        memory(self.pid())
    }
}

impl Drop for ActivatorProcess {
    fn drop(&mut self) {
        // SIGTERM: the activator drains and exits 0 (and a profiler wrapping it writes
        // its output); SIGKILL (kill_on_drop) only if it does not.
        stop_gracefully(&mut self.child, Duration::from_secs(20));
    }
}

/// SIGTERM, then wait up to `limit` for the process to exit.
fn stop_gracefully(child: &mut Child, limit: Duration) {
    let Some(pid) = child.id() else {
        return;
    };
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let deadline = std::time::Instant::now() + limit;
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// nginx as a reverse proxy (`proxy_pass` with keep-alive upstream connections) in
/// front of one server; stopped on drop.
pub struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Nginx {
    /// The nginx binary, if installed.
    pub fn binary() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    /// Starts nginx (as many workers as CPUs, as the activator's runtime has threads)
    /// proxying to `upstream`.
    pub async fn start(binary: &Path, upstream: SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let prefix = dir.path().display();
        let conf = format!(
            r#"worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream guest {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen {addr} backlog=4096;
        location / {{
            proxy_pass http://guest;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "nginx did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nginx { child, _dir: dir, addr }
    }

    /// The processes doing nginx's work: the master and its workers.
    pub fn pids(&self) -> Vec<u32> {
        let Some(master) = self.child.id() else {
            return Vec::new();
        };
        let mut pids = vec![master];
        pids.extend(children_of(master));
        pids
    }

    /// nginx's version line.
    pub fn version(binary: &Path) -> String {
        std::process::Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().replace("nginx version: ", ""))
            .unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master stops its workers on SIGQUIT/SIGTERM; SIGKILL would orphan them.
        stop_gracefully(&mut self.child, Duration::from_secs(2));
    }
}

/// The CPU time (user and system, all threads) `pids` have used so far, from
/// `/proc/<pid>/stat`; processes that are gone count nothing.
pub fn cpu_time(pids: &[u32]) -> Duration {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): state is the 1st,
            // utime the 12th, stime the 13th.
            let rest = &stat[stat.rfind(')')? + 1..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

/// The processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
