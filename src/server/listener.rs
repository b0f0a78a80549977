//! One listener: accepts connections up to a bound, serves each — the ingress with our
//! own HTTP/1.1 (`h1`) or hyper's HTTP/2, the admin listener with hyper (HTTP/1.1 with a
//! header-read timeout and a head size limit, or HTTP/2) — and on stop lets open
//! connections finish their current exchange.
//!
//! Owns: connection handling. Must not import the activator, lifecycle or backends.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

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
        let service = TowerToHyperService::new(service.clone());
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

/// Serves the ingress `service` on `listener` — HTTP/1.1 with our own connections
/// (`h1`), HTTP/2 with hyper's — until `stop` turns true, then lets open connections
/// finish their current exchange.
pub(super) async fn serve_ingress<S, B>(
    listener: TcpListener,
    service: S,
    limits: ListenerLimits,
    mut stop: watch::Receiver<bool>,
) where
    S: super::h1::Handler<Body = B>
        + hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    <S as hyper::service::Service<http::Request<hyper::body::Incoming>>>::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display + Send + Sync,
{
    let connection_limits = super::h1::Limits {
        header_read_timeout: limits.header_read_timeout,
        max_head: limits.max_header_bytes,
    };
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
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let (service, stop) = (service.clone(), stop.clone());
        tokio::spawn(async move {
            super::h1::serve_connection(stream, service, connection_limits, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    // Every connection gives its permit back when it is done.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
