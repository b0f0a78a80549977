//! The composition root: builds the backend from config, then [`app`] — the registry
//! and both routers with their tower layers, exactly as the binary serves them (tests
//! call it too) — and [`start`] runs it: the listeners (header-read timeout, bounded
//! connections), the catalog sync, and the graceful drain on SIGTERM: `/readyz` fails
//! first, new requests get 503, held and in-flight requests finish (bounded by
//! `drain_timeout`), VM owners end, local VMs are shut down, then the process exits.
//!
//! Owns: wiring and process lifecycle. Nothing imports this module but `main` and tests.

pub mod admin;
pub mod h1;
mod listener;
mod verbs;
mod workers;

pub use verbs::VerbGuard;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::activator::Activator;
use crate::auth::Authenticator;
use crate::backend::qemu::QemuBackend;
use crate::backend::Backend;
use crate::config::{BackendKind, Config};
use crate::ingress::{self, Ingress, IngressState};
use crate::lifecycle::IdleRules;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::readiness::Prober;
use listener::{ingress_connections, serve, serve_ingress, ListenerLimits};
use workers::Workers;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The backend could not be set up.
    #[error("backend: {0}")]
    Backend(String),
    /// The authenticator could not be set up (e.g. unreadable token file).
    #[error("ingress auth: {0}")]
    Auth(String),
    /// The ingress's worker threads could not be started.
    #[error("cannot start the ingress worker threads: {0}")]
    Workers(std::io::Error),
}

/// A running activator: its listeners' addresses and the handle to stop it.
pub struct Server {
    /// Where the ingress listens.
    pub ingress_addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: SocketAddr,
    /// The activator (for tests and benches to inspect).
    pub activator: Arc<Activator>,
    drain_timeout: Duration,
    stop_accepting: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

/// Builds the backend the config asks for.
pub async fn build_backend(config: &Config) -> Result<Arc<dyn Backend>, ServerError> {
    let backend: Arc<dyn Backend> = match config.backend {
        BackendKind::Qemu => QemuBackend::new(config.qemu.clone(), config.vms.clone())
            .map_err(|e| ServerError::Backend(e.to_string()))?,
        #[cfg(feature = "kubevirt")]
        BackendKind::Kubevirt => crate::backend::kubevirt::KubevirtBackend::connect(config.kubevirt.clone())
            .await
            .map_err(|e| ServerError::Backend(e.to_string()))?,
        #[cfg(not(feature = "kubevirt"))]
        BackendKind::Kubevirt => {
            return Err(ServerError::Backend(
                "this build has no kubevirt backend (it was built without the `kubevirt` feature)".into(),
            ))
        }
    };
    Ok(backend)
}

/// The activator over one backend, as the binary serves it: the registry, and both
/// routers with every layer the binary puts on them. Tests call this too (`oneshot`
/// on `ingress`), so they exercise exactly what runs. Starts no task: [`start`] adds
/// the listeners and the catalog sync.
pub struct App {
    /// The registry of VMs.
    pub activator: Arc<Activator>,
    /// `POST /{namespace}/{vm}[/{rest}]`, behind the ingress concurrency limit.
    pub ingress: Ingress,
    /// `/metrics`, `/healthz`, `/readyz`, `/v1/vms`.
    pub admin: Router,
}

/// Builds the [`App`] for `config` over `backend`.
pub async fn app(config: &Config, backend: Arc<dyn Backend>) -> Result<App, ServerError> {
    let activator = Activator::new(
        backend,
        Arc::new(Prober::new(config.readiness.clone())),
        Metrics::new(),
        IdleRules {
            recheck: config.idle.check_interval,
            default_policy: config.idle.policy,
            adaptive: config.idle.adaptive.settings(),
        },
    );
    let auth = Authenticator::from_config(&config.ingress.auth)
        .await
        .map_err(ServerError::Auth)?;
    let state = IngressState::new(
        activator.clone(),
        Proxy::with_threads(&config.proxy, worker_count(config.ingress.worker_threads)),
        config.ingress.clone(),
        auth,
    );
    let ingress = ingress::service(state, config.ingress.max_concurrent_requests);
    let verbs = VerbGuard::from_config(config).await.map_err(ServerError::Auth)?;
    let admin = admin::router(activator.clone(), verbs);
    Ok(App {
        activator,
        ingress,
        admin,
    })
}

/// A listening socket on `addr` with `backlog` connections queued for `accept`. tokio's
/// `TcpListener::bind` fixes the backlog at 1024, which a burst of senders overflows: their
/// SYNs are dropped and retried seconds later, so a flood would reach us late instead of
/// being answered (held, or 503 at once) when it comes.
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted activator binds while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The ingress worker threads `ingress.worker_threads` asks for: 0 means one per core.
fn worker_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Binds both listeners and starts serving with `backend`.
pub async fn start(config: Config, backend: Arc<dyn Backend>) -> Result<Server, ServerError> {
    let App {
        activator,
        ingress: ingress_router,
        admin: admin_router,
    } = app(&config, backend).await?;

    let listen = |addr| bind(addr, config.ingress.listen_backlog).map_err(|source| ServerError::Bind { addr, source });
    let ingress_listener = listen(config.listen)?;
    let admin_listener = listen(config.admin_listen)?;
    let ingress_addr = ingress_listener.local_addr().expect("bound socket has an address");
    let admin_addr = admin_listener.local_addr().expect("bound socket has an address");

    let (stop_accepting, stop_rx) = watch::channel(false);
    let limits = ListenerLimits {
        header_read_timeout: config.ingress.header_read_timeout,
        max_header_bytes: config.ingress.max_header_bytes,
        max_connections: config.ingress.max_connections,
    };
    let workers = Workers::start(
        worker_count(config.ingress.worker_threads),
        ingress_connections(ingress_router, limits, stop_rx.clone()),
    )
    .map_err(ServerError::Workers)?;
    let listeners = vec![
        tokio::spawn(serve_ingress(
            ingress_listener,
            workers,
            limits.max_connections,
            stop_rx.clone(),
        )),
        tokio::spawn(serve(admin_listener, admin_router, limits, stop_rx)),
    ];
    let background = vec![tokio::spawn(activator.clone().run_catalog_sync())];
    tracing::info!(%ingress_addr, %admin_addr, vms = activator.vms().len(), "vm-activator listening");
    Ok(Server {
        ingress_addr,
        admin_addr,
        activator,
        drain_timeout: config.drain_timeout,
        stop_accepting,
        listeners,
        background,
    })
}

impl Server {
    /// Graceful drain: refuse new requests (503, `/readyz` fails), let held and
    /// in-flight ones finish until the drain timeout, close the listeners, shut the
    /// backend down. Returns whether every request finished in time.
    pub async fn drain(self) -> bool {
        let deadline = Instant::now() + self.drain_timeout;
        self.activator.start_draining();
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        let finished = self.activator.wait_drained(deadline).await;
        if !finished {
            tracing::warn!("drain timeout reached with requests still held or in flight");
            // Never leave a held event unanswered: 503, so the sender retries elsewhere.
            self.activator.reject_held();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for task in &self.background {
            task.abort();
        }
        let _ = self.stop_accepting.send(true);
        for listener in self.listeners {
            // Connections get what is left of the drain timeout to finish their responses.
            let _ = tokio::time::timeout_at(deadline + Duration::from_millis(500), listener).await;
        }
        self.activator.shutdown();
        self.activator.backend().shutdown().await;
        tracing::info!("drained");
        finished
    }
}

/// Runs the activator until SIGTERM or SIGINT, then drains.
pub async fn run(config: Config) -> Result<(), ServerError> {
    let backend = build_backend(&config).await?;
    let server = start(config, backend).await?;
    wait_for_signal().await;
    server.drain().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// HTTP/1.1 connections hold the ingress's request future inline.
impl h1::Handler for Ingress {
    type Body = ingress::IngressBody;

    fn handle(
        &self,
        method: http::Method,
        uri: http::Uri,
        headers: crate::http1::lines::Fields,
        body: h1::RequestBody,
    ) -> impl std::future::Future<Output = http::Response<ingress::IngressBody>> + Send {
        self.answer(method, uri, headers, body)
    }
}
