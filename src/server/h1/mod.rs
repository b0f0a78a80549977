//! The ingress's own HTTP/1.1 connections, on `httparse`: hyper's server pins an 8 KiB
//! read buffer and an 8 KiB write buffer per connection for as long as a request is held,
//! which is what a held event cost most; here a connection holds only what its request
//! holds. Each connection is served in one task, which also reads the request body,
//! drives the guest connection (the proxy's) and writes the response: no channel, no
//! second task. HTTP/2 (prior knowledge) stays on hyper.
//!
//! `head.rs` parses a request head and decides its framing (`crate::http1` decodes a
//! chunked body), `write.rs` frames a response, `body.rs` is the request body read from
//! the connection, `conn.rs` the connection's loop. What hyper's server refuses is
//! refused here the same way: `tests/h1.rs` sends every row of a request-smuggling
//! table to both and compares; `tests/fuzz/fuzz_targets/h1.rs` fuzzes the parsers.
//!
//! Owns: HTTP/1.1 on the ingress listener. Must not import the activator, lifecycle or
//! backends.

mod body;
mod conn;
pub mod head;
mod write;

pub use crate::http1::chunked::{ChunkError, Decoder as ChunkedDecoder, Step as ChunkedStep};
pub use body::{BodyError, RequestBody};
pub use conn::Limits;

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// What answers the requests of an HTTP/1.1 connection: a service whose future is its
/// own type, not boxed — the connection's task holds the request's state inline, with
/// no allocation for it.
pub trait Handler {
    /// The response body.
    type Body: Body<Data = Bytes>;
    /// Answers the request with this method, target, header fields and body (its parts
    /// as the connection has them: no `Request` is built only to be taken apart again,
    /// and no header map).
    fn handle(
        &self,
        method: http::Method,
        uri: http::Uri,
        headers: crate::http1::lines::Fields,
        body: RequestBody,
    ) -> impl std::future::Future<Output = Response<Self::Body>> + Send;
}

/// The first bytes of an HTTP/2 connection with prior knowledge.
const H2_START: &[u8; 4] = b"PRI ";

/// Serves one connection with `service`: HTTP/2 when it begins with the HTTP/2 preface
/// (hyper's server, through its `Service` impl), else HTTP/1.1 (ours, through its
/// `Handler` impl). Returns when the connection is done; when
/// `stop` turns true, the exchanges in progress finish first.
pub async fn serve_connection<S, B>(stream: TcpStream, service: S, limits: Limits, mut stop: watch::Receiver<bool>)
where
    S: Handler<Body = B>
        + hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <S as hyper::service::Service<Request<Incoming>>>::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display + Send + Sync,
{
    let sniffed = tokio::time::timeout(limits.header_read_timeout, is_h2(&stream)).await;
    match sniffed {
        Ok(Some(true)) => {
            let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let stopping = tokio::select! {
                _ = connection.as_mut() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopping {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
        Ok(Some(false)) => conn::serve(stream, service, limits, stop).await,
        // Closed, or nothing sent in time.
        Ok(None) | Err(_) => {}
    }
}

/// Whether the connection starts as HTTP/2 with prior knowledge (peeked: nothing is
/// consumed); `None` if it closes first.
async fn is_h2(stream: &TcpStream) -> Option<bool> {
    let mut first = [0u8; 4];
    loop {
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if first[..n] != H2_START[..n] {
            return Some(false);
        }
        if n == H2_START.len() {
            return Some(true);
        }
        // A prefix of the preface so far ("P", "PR", "PRI"): rare; look again shortly
        // (the bytes already there keep the socket readable, so waiting for readiness
        // would spin).
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
