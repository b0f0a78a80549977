//! One listener: accepts connections up to a bound, serves each — the ingress's on its
//! worker threads (`workers.rs`) with our own HTTP/1.1 (`h1`) or hyper's HTTP/2, the
//! admin listener's here with hyper (HTTP/1.1 with a header-read timeout and a head size
//! limit, or HTTP/2) — and on stop lets open connections finish their current exchange.
//!
//! Owns: connection handling. Must not import the activator, lifecycle or backends.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::workers::Workers;

/// Limits of one listener.
#[derive(Clone, Copy)]
pub(super) struct ListenerLimits {
    pub(super) header_read_timeout: Duration,
    pub(super) max_header_bytes: usize,
    pub(super) max_connections: usize,
}

/// Serves `service` on `listener` until `stop` turns true, then lets open connections
/// finish their current exchange.
pub(super) async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
) where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    accept_each(&listener, &slots, &mut stop, |stream, permit| {
        let service = TowerToHyperService::new(service.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    })
    .await;
    drop(listener);
    graceful.shutdown().await;
}

/// Serves the ingress's connections accepted on `listener` on `workers` — HTTP/1.1 with
/// our own connections (`h1`), HTTP/2 with hyper's — until `stop` turns true, then lets
/// open connections finish their current exchange.
pub(super) async fn serve_ingress(
    listener: TcpListener,
    workers: Workers,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    accept_each(&listener, &slots, &mut stop, |stream, permit| {
        workers.hand_off(stream, permit)
    })
    .await;
    drop(listener);
    workers.finish().await;
}

/// What serves one ingress connection on a worker thread: `service` over HTTP/1.1 (ours)
/// or HTTP/2 (hyper's), within `limits`, finishing its exchange in progress once `stop`
/// turns true.
pub(super) fn ingress_connections<S, B>(
    service: S,
    limits: ListenerLimits,
    stop: watch::Receiver<bool>,
) -> impl Fn(TcpStream) -> BoxedConnection + Clone + Send + 'static
where
    S: super::h1::Handler<Body = B>
        + hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    <S as hyper::service::Service<http::Request<hyper::body::Incoming>>>::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display + Send + Sync,
{
    let connection_limits = super::h1::Limits {
        header_read_timeout: limits.header_read_timeout,
        max_head: limits.max_header_bytes,
    };
    move |stream| {
        Box::pin(super::h1::serve_connection(
            stream,
            service.clone(),
            connection_limits,
            stop.clone(),
        ))
    }
}

/// One ingress connection being served (boxed once per connection, not per request).
pub(super) type BoxedConnection = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Accepts connections on `listener` while fewer than `slots`' permits are out, passing
/// each with its permit to `each`, until `stop` turns true.
async fn accept_each(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
    mut each: impl FnMut(TcpStream, OwnedSemaphorePermit),
) {
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            _ = stopped(stop) => return,
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
            _ = stopped(stop) => return,
        };
        let _ = stream.set_nodelay(true);
        each(stream, permit);
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
