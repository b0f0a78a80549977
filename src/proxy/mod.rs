//! Forwards one request to a guest and streams the answer back. Strips hop-by-hop
//! headers (RFC 9110 §7.6.1); forwards `traceparent` and all CloudEvents headers
//! untouched; bounds the wait for the guest's response headers. Tells a request that
//! never reached the guest (a connect failure: it may be sent again) from one that
//! failed after it was sent (it may not: the guest may have acted on it).
//!
//! Long because: half of it is the tests of that line between "not sent" and "sent",
//! which need the private pieces.
//!
//! The HTTP/1.1 spoken to guests is ours (`wire.rs`, on `httparse`, as the ingress's
//! is), and so are the connections (`conn.rs`): the request's own task writes the request
//! and reads the answer, with no task, channel or dispatch in between.
//!
//! Owns: the connections to guests (`pool.rs`, `conn.rs`), the wire format to them
//! (`wire.rs`) and header hygiene. Must not import the
//! lifecycle, activator, backend or ingress.

mod body;
mod conn;
#[cfg(test)]
mod differential;
mod pool;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
#[cfg(test)]
use http::Request;
use http::Response;
use tokio::time::Instant;

use crate::config::ProxyConfig;
#[cfg(test)]
use crate::http1::lines::ReadFields;
use crate::http1::lines::{lowercase_is, text, Fields, Lines};
use crate::http1::maps;
use crate::vm::Endpoint;
pub use body::{BodyError, GuardedBody, PooledBody};
use conn::Exchange;
use pool::Pool;
pub use pool::{use_shard as use_pool_shard, ConnectError};

/// Why a request did not get an answer from the guest.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The guest did not send response headers in time (→ 504).
    #[error("the guest did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was (perhaps partly) sent (→ 502; the
    /// endpoint is re-probed).
    #[error("the guest connection failed: {0}")]
    Unreachable(String),
    /// The guest announced a response body larger than `proxy.max_response_body_bytes`
    /// (→ 502; nothing of it is passed on).
    #[error("the guest answered with a body of {declared} bytes, more than proxy.max_response_body_bytes ({limit})")]
    ResponseTooLarge {
        /// The body's `Content-Length`.
        declared: u64,
        /// The bound.
        limit: u64,
    },
    /// No connection could be made until the request's budget was spent (→ 502, or 504
    /// when the attempts timed out).
    #[error("could not connect to the guest ({attempts} attempt(s)); last: {last}")]
    NotConnected {
        /// Connection attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: ConnectError,
    },
}

/// A request made ready for a guest: origin-form target, hop-by-hop headers stripped.
/// Kept whole until a guest has it, so an attempt that never reached one can be
/// repeated without copying anything.
#[derive(Debug)]
pub struct GuestRequest {
    method: http::Method,
    uri: http::Uri,
    headers: Fields,
    body: Bytes,
}

impl Drop for GuestRequest {
    /// A header map (an HTTP/2 request's) is kept for the next head this thread parses
    /// (`http1::maps`); lines keep their span list themselves.
    fn drop(&mut self) {
        if let Fields::Map(map) = std::mem::take(&mut self.headers) {
            maps::give_back(map);
        }
    }
}

/// What a failed attempt leaves.
#[derive(Debug)]
pub enum Failure {
    /// No byte of the request reached the guest: the caller, which lent it, may send it
    /// again.
    NotSent(ConnectError),
    /// The request may have reached the guest, or no answer came in time.
    Failed(ProxyError),
}

/// The client to guests. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    pool: Arc<Pool>,
    /// `proxy.max_response_body_bytes`.
    max_response_body: u64,
}

impl Proxy {
    /// A client with these connection settings, used from threads that share one pool
    /// shard (see [`Proxy::with_threads`]).
    pub fn new(config: &ProxyConfig) -> Proxy {
        Proxy::with_threads(config, 0)
    }

    /// A client with these connection settings whose idle connections are kept apart for
    /// `threads` threads that serve requests on runtimes of their own (each calls
    /// [`use_pool_shard`] with its index, 1 to `threads`), and together for all others.
    pub fn with_threads(config: &ProxyConfig, threads: usize) -> Proxy {
        Proxy {
            pool: Arc::new(Pool::new(config, threads)),
            max_response_body: config.max_response_body_bytes,
        }
    }

    /// Turns the sender's request into one for a guest at `target` (origin form). Its
    /// `Host` and `Content-Length` are written when it is sent: the guest's address and
    /// the body's length.
    pub fn prepare(method: http::Method, target: http::Uri, mut headers: Fields, body: Bytes) -> GuestRequest {
        match &mut headers {
            Fields::Map(map) => strip_hop_by_hop(map),
            Fields::Lines(lines) => strip_hop_by_hop_lines(lines),
        }
        GuestRequest {
            method,
            uri: target,
            headers,
            body,
        }
    }

    /// Sends `request` to `endpoint` — on an idle connection, else a new one made by
    /// `connect_by` — and returns the guest's response with its body still streaming,
    /// once its headers came by `deadline` (the caller's `timeout` from now; the body
    /// then has as long again).
    ///
    /// The request is lent, not given: the caller keeps it to send again when nothing
    /// was sent. A plain fn returning a block, not an `async fn`: an async fn's future
    /// keeps its arguments twice, and this future is part of the one every request
    /// allocates for its forwarding.
    #[allow(clippy::manual_async_fn)] // On purpose: see above.
    pub fn send<'a>(
        &'a self,
        endpoint: Endpoint,
        request: &'a GuestRequest,
        connect_by: Instant,
        deadline: Instant,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response<PooledBody>, Failure>> + Send + 'a {
        async move {
            loop {
                let (mut conn, reused) = match self.pool.checkout(endpoint) {
                    Some(conn) => (conn, true),
                    // Boxed: a new connection is the rare case, and its future inline would
                    // make every request's larger.
                    None => match Box::pin(self.pool.connect(endpoint, connect_by)).await {
                        Ok(conn) => (conn, false),
                        Err(error) => return Err(Failure::NotSent(error)),
                    },
                };
                match conn.exchange_by(request, deadline).await {
                    None => return Err(Failure::Failed(ProxyError::Timeout(timeout))),
                    Some(Ok(head)) => {
                        let limit = self.max_response_body;
                        if let wire::Framing::Length(declared) = head.framing {
                            if declared > limit {
                                // Refused before anything is passed on; the connection closes.
                                return Err(Failure::Failed(ProxyError::ResponseTooLarge { declared, limit }));
                            }
                        }
                        let mut headers = head.headers;
                        strip_hop_by_hop(&mut headers);
                        let body = PooledBody {
                            conn: Some(conn),
                            reading: body::Reading::new(head.framing),
                            keep_alive: head.keep_alive,
                            pool: self.pool.clone(),
                            bounds: body::Bounds {
                                left: limit,
                                limit,
                                deadline,
                                timeout,
                                timer: None,
                            },
                        };
                        let mut response = Response::new(body);
                        *response.status_mut() = head.status;
                        *response.version_mut() = head.version;
                        *response.headers_mut() = headers;
                        return Ok(response);
                    }
                    // A connection the guest had closed meanwhile took none of the request:
                    // try the next one.
                    Some(Err(Exchange::NotSent(_))) if reused => {}
                    Some(Err(Exchange::NotSent(error))) => {
                        let error = ConnectError::Refused(format!(
                            "closed before the request was written: {}",
                            conn::describe(&error)
                        ));
                        return Err(Failure::NotSent(error));
                    }
                    Some(Err(Exchange::Failed(error))) => return Err(Failure::Failed(ProxyError::Unreachable(error))),
                }
            }
        }
    }
}

#[cfg(test)]
impl Proxy {
    /// Sends `request` to `endpoint` with five seconds for everything: the tests' bound.
    pub(crate) async fn send_within_5s(
        &self,
        endpoint: Endpoint,
        request: &GuestRequest,
    ) -> Result<Response<PooledBody>, Failure> {
        let within = Instant::now() + Duration::from_secs(5);
        self.send(endpoint, request, within, within, Duration::from_secs(5))
            .await
    }
}

/// Removes the headers that describe one connection rather than the message: the
/// fixed list of RFC 9110 §7.6.1 plus every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Fast path, one pass with no hashing: most messages carry none of these.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// [`strip_hop_by_hop`] for fields kept where their head carried them.
fn strip_hop_by_hop_lines(lines: &mut Lines) {
    // Fast path, one pass: most messages carry none of these.
    if !lines.iter().any(|(name, _)| is_hop_by_hop_name(name)) {
        return;
    }
    // The names `Connection` lists, lowercase (few: a Vec searched in turn).
    let named: Vec<Vec<u8>> = lines
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"connection"))
        .filter_map(|(_, value)| text(value))
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().as_bytes().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    lines.retain(|name, _| !is_hop_by_hop_name(name) && !named.iter().any(|named| named.eq_ignore_ascii_case(name)));
}

/// Whether `name` is one of the fixed hop-by-hop headers (or `Connection`, which may
/// name more).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    is_hop_by_hop_name(name.as_str().as_bytes())
}

/// [`is_hop_by_hop`] for a name in any case.
fn is_hop_by_hop_name(name: &[u8]) -> bool {
    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "keep-alive",
        "proxy-connection",
    ];
    // The length first: it rules out nearly every name.
    HOP_BY_HOP
        .iter()
        .any(|hop| hop.len() == name.len() && lowercase_is(name, hop.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::Full;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("ce-id", HeaderValue::from_static("abc"));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["ce-id", "traceparent"]);
    }

    #[test]
    fn strips_hop_by_hop_from_fields_read_in_place_in_any_case() {
        let prepared = |head: &str| {
            let mut buf = bytes::BytesMut::from(head);
            let head = crate::server::h1::head::parse(&mut buf, 1024).unwrap().unwrap();
            Proxy::prepare(
                http::Method::POST,
                http::Uri::from_static("/"),
                Fields::Lines(head.headers),
                Bytes::new(),
            )
        };
        let request = prepared(
            "POST / HTTP/1.1\r\nConnection: Keep-Alive, X-Secret\r\nKEEP-ALIVE: 5\r\nx-secret: 1\r\nCE-Id: abc\r\nTE: trailers\r\ntraceparent: 00\r\n\r\n",
        );
        let left: Vec<_> = request.headers.fields().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(left, [&b"CE-Id"[..], b"traceparent"]);
        let request = prepared("POST / HTTP/1.1\r\nce-id: 1\r\n\r\n");
        assert_eq!(request.headers.len(), 1);
    }

    /// A guest on loopback answering 202 (and `close` when asked), counting the
    /// connections it accepted.
    async fn counting_guest(close: bool) -> (Endpoint, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| async move {
                    let mut response = Response::new(Full::new(Bytes::from_static(b"accepted")));
                    *response.status_mut() = http::StatusCode::ACCEPTED;
                    if close {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (endpoint, accepted)
    }

    async fn post(proxy: &Proxy, endpoint: Endpoint) -> http::StatusCode {
        let (parts, ()) = Request::post("/x").body(()).unwrap().into_parts();
        let request = Proxy::prepare(
            parts.method,
            http::Uri::from_static("/events"),
            parts.headers.into(),
            Bytes::from_static(b"{}"),
        );
        let response = match proxy.send_within_5s(endpoint, &request).await {
            Ok(response) => response,
            Err(_) => panic!("the guest answers"),
        };
        let status = response.status();
        http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
        status
    }

    /// A connection is registered with the runtime of the thread that made it: a thread
    /// serving requests on a runtime of its own (an ingress worker) keeps its idle
    /// connections apart and never takes another thread's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn each_shard_reuses_only_its_own_connections() {
        use std::sync::atomic::Ordering::SeqCst;
        let proxy = Proxy::with_threads(&ProxyConfig::default(), 1);
        let (endpoint, accepted) = counting_guest(false).await;
        assert_eq!(post(&proxy, endpoint).await, http::StatusCode::ACCEPTED);
        assert_eq!(proxy.pool.idle_count(endpoint), 1);

        let worker = proxy.clone();
        let (worker_idle, worker_reused) = std::thread::spawn(move || {
            use_pool_shard(1);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let idle_before = worker.pool.idle_count(endpoint);
                assert_eq!(post(&worker, endpoint).await, http::StatusCode::ACCEPTED);
                assert_eq!(post(&worker, endpoint).await, http::StatusCode::ACCEPTED);
                (idle_before, worker.pool.idle_count(endpoint))
            })
        })
        .join()
        .unwrap();
        assert_eq!(worker_idle, 0, "the other shard's connection is not seen");
        assert_eq!(worker_reused, 1, "the worker reused its own connection");
        assert_eq!(accepted.load(SeqCst), 2, "one connection per shard");

        assert_eq!(post(&proxy, endpoint).await, http::StatusCode::ACCEPTED);
        assert_eq!(accepted.load(SeqCst), 2, "this thread still has its own");
    }

    #[tokio::test]
    async fn connections_are_reused_once_a_response_was_read() {
        let proxy = Proxy::new(&ProxyConfig::default());
        let (endpoint, accepted) = counting_guest(false).await;
        for _ in 0..10 {
            assert_eq!(post(&proxy, endpoint).await, http::StatusCode::ACCEPTED);
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one connection for all"
        );

        // A guest that closes each connection gets a new one per request, never an error.
        let (endpoint, accepted) = counting_guest(true).await;
        for _ in 0..5 {
            assert_eq!(post(&proxy, endpoint).await, http::StatusCode::ACCEPTED);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    /// A guest on a runtime of its own (so its tasks do not count in the test's): answers
    /// 202 with `body_chunks` chunks of 1 KiB, `chunk_pause` apart; reports each
    /// connection's end (how many bytes it could still write after the last request).
    fn guest_on_its_own_runtime(
        body_chunks: usize,
        chunk_pause: Duration,
    ) -> (Endpoint, std::sync::mpsc::Receiver<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = listener.local_addr().unwrap();
        let (ended, ends) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let ended = ended.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |_request: Request<hyper::body::Incoming>| async move {
                                let chunks = futures_util::stream::unfold(0, move |sent| async move {
                                    if sent == body_chunks {
                                        return None;
                                    }
                                    tokio::time::sleep(chunk_pause).await;
                                    Some((
                                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(
                                            vec![b'x'; 1024],
                                        ))),
                                        sent + 1,
                                    ))
                                });
                                let mut response = Response::new(http_body_util::StreamBody::new(chunks));
                                *response.status_mut() = http::StatusCode::ACCEPTED;
                                Ok::<_, std::convert::Infallible>(response)
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                        let _ = ended.send(());
                    });
                }
            });
        });
        (endpoint, ends)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_task_runs_per_guest_connection() {
        let proxy = Proxy::new(&ProxyConfig::default());
        let (endpoint, _ends) = guest_on_its_own_runtime(1, Duration::ZERO);
        let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
        let before = alive();
        // Eight at once: eight connections, all kept idle afterwards.
        let statuses = futures_util::future::join_all((0..8).map(|_| post(&proxy, endpoint))).await;
        assert!(statuses.iter().all(|s| *s == http::StatusCode::ACCEPTED));
        assert_eq!(proxy.pool.idle_count(endpoint), 8);
        assert!(
            alive() <= before + 1,
            "only the pool's reaper: {} tasks, {before} before",
            alive()
        );
    }

    #[tokio::test]
    async fn a_sender_that_hangs_up_mid_body_closes_the_guest_connection() {
        let proxy = Proxy::new(&ProxyConfig::default());
        // 50 chunks, 20 ms apart: a second of body.
        let (endpoint, ends) = guest_on_its_own_runtime(50, Duration::from_millis(20));
        let (parts, ()) = Request::post("/x").body(()).unwrap().into_parts();
        let request = Proxy::prepare(
            parts.method,
            http::Uri::from_static("/events"),
            parts.headers.into(),
            Bytes::new(),
        );
        let Ok(response) = proxy.send_within_5s(endpoint, &request).await else {
            panic!("the guest answers");
        };
        let mut body = response.into_body();
        let first = http_body_util::BodyExt::frame(&mut body).await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), 1024);
        drop(body);
        let closed = tokio::task::spawn_blocking(move || ends.recv_timeout(Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(closed.is_ok(), "the guest's connection ended when the sender hung up");
        assert_eq!(proxy.pool.idle_count(endpoint), 0, "and it was not kept");
    }

    /// A guest that answers each connection's first request with 202 (keep-alive, as
    /// far as the client can tell) and closes the connection 20 ms later, as a guest with
    /// a short idle timeout does; counts the connections it accepted.
    async fn closing_guest() -> (Endpoint, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                        head.push(byte[0]);
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                });
            }
        });
        (endpoint, accepted)
    }

    #[tokio::test]
    async fn an_idle_connection_the_guest_closed_is_never_handed_out() {
        let proxy = Proxy::new(&ProxyConfig::default());
        let (endpoint, accepted) = closing_guest().await;
        // The request carries a 2-byte body: the guest never reads it, so each
        // connection's head is all it sees.
        assert_eq!(post(&proxy, endpoint).await, http::StatusCode::ACCEPTED);
        assert_eq!(proxy.pool.idle_count(endpoint), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The idle connection was closed by the guest meanwhile: a new one, no error.
        for _ in 0..3 {
            assert_eq!(post(&proxy, endpoint).await, http::StatusCode::ACCEPTED);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn idle_connections_are_reaped_after_the_idle_timeout() {
        let config = ProxyConfig {
            pool_idle_timeout: Duration::from_millis(300),
            ..ProxyConfig::default()
        };
        let proxy = Proxy::new(&config);
        let (endpoint, ends) = guest_on_its_own_runtime(1, Duration::ZERO);
        assert_eq!(post(&proxy, endpoint).await, http::StatusCode::ACCEPTED);
        assert_eq!(proxy.pool.idle_count(endpoint), 1);
        // The reaper sweeps every second at the least.
        let closed = tokio::task::spawn_blocking(move || ends.recv_timeout(Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(closed.is_ok(), "the idle connection was closed");
        assert_eq!(proxy.pool.idle_count(endpoint), 0);
    }

    #[tokio::test]
    async fn a_refused_connection_is_reported_as_nothing_sent() {
        let proxy = Proxy::new(&ProxyConfig::default());
        let endpoint = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let (parts, ()) = Request::post("/x").body(()).unwrap().into_parts();
        let request = Proxy::prepare(
            parts.method,
            http::Uri::from_static("/events?a=1"),
            parts.headers.into(),
            Bytes::from_static(b"{}"),
        );
        match proxy.send_within_5s(endpoint, &request).await {
            Err(Failure::NotSent(ConnectError::Refused(_))) => {}
            other => panic!("expected nothing sent, got {:?}", other.map(|r| r.status())),
        }
    }
}
