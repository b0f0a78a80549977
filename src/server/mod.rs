//! The composition root: builds the backend from config, the activator, both routers
//! and their tower layers, the catalog-sync and idle tasks; runs the listeners
//! (header-read timeout, bounded connections) and the graceful drain on SIGTERM:
//! `/readyz` fails first, new requests get 503, held and in-flight requests finish
//! (bounded by `drain_timeout`), local VMs are shut down, then the process exits.
//!
//! Owns: wiring and process lifecycle. Nothing imports this module but `main` and tests.

pub mod admin;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::ServiceBuilder;

use crate::activator::Activator;
use crate::auth::Authenticator;
use crate::backend::kubevirt::KubevirtBackend;
use crate::backend::qemu::QemuBackend;
use crate::backend::Backend;
use crate::config::{BackendKind, Config};
use crate::ingress::{self, IngressState};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::readiness::Prober;

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
}

/// Limits of one listener.
#[derive(Clone, Copy)]
struct ListenerLimits {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
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
        BackendKind::Kubevirt => KubevirtBackend::connect(config.kubevirt.clone())
            .await
            .map_err(|e| ServerError::Backend(e.to_string()))?,
    };
    Ok(backend)
}

/// Binds both listeners and starts serving with `backend`.
pub async fn start(config: Config, backend: Arc<dyn Backend>) -> Result<Server, ServerError> {
    let metrics = Metrics::new();
    let activator = Activator::new(backend, Prober::new(config.readiness.clone()), metrics);
    let auth = Authenticator::from_config(&config.ingress.auth)
        .await
        .map_err(ServerError::Auth)?;
    let state = IngressState::new(
        activator.clone(),
        Proxy::new(&config.proxy),
        config.ingress.clone(),
        auth,
    );
    let ingress_router =
        ingress::router(state).layer(ServiceBuilder::new().concurrency_limit(config.ingress.max_concurrent_requests));
    let admin_router = admin::router(activator.clone());

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })
    };
    let ingress_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let ingress_addr = ingress_listener.local_addr().expect("bound socket has an address");
    let admin_addr = admin_listener.local_addr().expect("bound socket has an address");

    let (stop_accepting, stop_rx) = watch::channel(false);
    let limits = ListenerLimits {
        header_read_timeout: config.ingress.header_read_timeout,
        max_header_bytes: config.ingress.max_header_bytes,
        max_connections: config.ingress.max_connections,
    };
    let listeners = vec![
        tokio::spawn(serve(ingress_listener, ingress_router, limits, stop_rx.clone())),
        tokio::spawn(serve(admin_listener, admin_router, limits, stop_rx)),
    ];
    let background = vec![
        tokio::spawn(activator.clone().run_catalog_sync()),
        tokio::spawn(crate::idle::run(activator.clone(), config.idle.check_interval)),
    ];
    tracing::info!(%ingress_addr, %admin_addr, vms = activator.gates().len(), "vm-activator listening");
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
        self.activator.backend().shutdown().await;
        tracing::info!("drained");
        finished
    }
}

/// Serves `router` on `listener` until `stop` turns true, then lets open connections
/// finish their current exchange.
async fn serve(listener: TcpListener, router: Router, limits: ListenerLimits, mut stop: watch::Receiver<bool>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            _ = stopped(&mut stop) => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
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
