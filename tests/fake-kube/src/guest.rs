//! The guest application the simulated clusters boot: a loopback address of its own
//! (bound at once, so nothing else can answer for it, but refusing connections until
//! the guest listens), and an HTTP server that accepts CloudEvents with 202, lists their
//! ids at `GET /events` and answers `GET /healthz`. Public so that tests playing
//! virt-controller or the kubelet against a real API server boot the same guests.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;

/// Event ids one guest accepted, over all its boots.
pub type GuestLog = Arc<Mutex<Vec<String>>>;

/// The `traceparent` each accepted event (by id) came with, over every guest of the
/// process: what the trace tests check the activator forwarded.
static TRACEPARENTS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The `traceparent` header the event with this id reached a guest with.
pub fn traceparent_of(id: &str) -> Option<String> {
    let seen = TRACEPARENTS.lock().unwrap();
    seen.iter().rev().find(|(seen, _)| seen == id).map(|(_, tp)| tp.clone())
}

/// Addresses handed to guests: 127.1.x.y (y in 1..=254), unique within the process.
static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// Binds (without listening) the next free guest address on `port`, skipping any that
/// another process holds.
pub fn reserve_socket(port: u16) -> Option<tokio::net::TcpSocket> {
    for _ in 0..1024 {
        let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(127, 1, (n / 254 % 256) as u8, (n % 254 + 1) as u8);
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.set_reuseaddr(true).ok()?;
        if socket.bind(SocketAddr::new(IpAddr::V4(ip), port)).is_ok() {
            return Some(socket);
        }
    }
    None
}

/// How a guest's HTTP server behaves. The default is a modern server (large listen
/// backlog, accepts at once, keep-alive); the others model a legacy one.
#[derive(Clone, Copy, Debug)]
pub struct GuestStyle {
    /// The listen backlog (Python's `http.server` has 5; the kernel queues about one
    /// more, then drops SYNs).
    pub backlog: u32,
    /// A pause after each accepted connection (a single-threaded server busy with it).
    pub accept_every: Duration,
    /// Answer each request with `Connection: close` (HTTP/1.0 style).
    pub close_each: bool,
    /// After the first answer to a probe (`GET /healthz`), stop listening for this long
    /// — connections are refused — then listen again (an application restarting right
    /// after its health check passed).
    pub refuse_after_ready: Duration,
    /// How it answers events (probes are answered as usual).
    pub fault: GuestFault,
}

/// A guest application that misbehaves once it is up: its probes pass, its answers to
/// events do not come as they should.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFault {
    /// Events are accepted with 202.
    None,
    /// Events are neither read nor answered; the connection stays open.
    Stall,
    /// Events are logged and answered 200 with a 1,000-byte body that comes one byte
    /// this far apart.
    Trickle(Duration),
    /// Events are logged and answered 200 with a body without end, in 64 KiB chunks:
    /// announced by a `Content-Length` of this many bytes, or chunked with `None`.
    Oversize(Option<u64>),
}

impl Default for GuestStyle {
    fn default() -> Self {
        GuestStyle {
            backlog: 1024,
            accept_every: Duration::ZERO,
            close_each: false,
            refuse_after_ready: Duration::ZERO,
            fault: GuestFault::None,
        }
    }
}

/// Serves the guest application on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, log: GuestLog) {
    crate::api::serve_router(listener, router(log)).await;
}

/// Listens on `socket` (bound by [`reserve_socket`]) and serves the guest application
/// the way `style` says, until the task is dropped (its connections with it).
pub async fn run(socket: tokio::net::TcpSocket, log: GuestLog, style: GuestStyle) {
    let address = socket.local_addr().expect("bound");
    let listener = match socket.listen(style.backlog) {
        Ok(listener) => listener,
        Err(e) => {
            // Loud: a guest that never listens shows up in a test only as an endpoint
            // that never passes its probe.
            eprintln!("fake guest: cannot listen on {address}: {e}");
            return;
        }
    };
    // The first probe's answer waits until the listener is closed, so every connection
    // made after the activator saw it answer is refused (none is caught half-accepted in
    // the backlog and reset).
    let refusing = Arc::new(Refusing {
        armed: std::sync::atomic::AtomicBool::new(!style.refuse_after_ready.is_zero()),
        probed: tokio::sync::Notify::new(),
        closed: tokio::sync::Notify::new(),
    });
    let app = router(log).layer(axum::middleware::from_fn({
        let refusing = refusing.clone();
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let refusing = refusing.clone();
            async move {
                let is_probe = request.uri().path() == "/healthz";
                if is_probe && refusing.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    refusing.probed.notify_one();
                    refusing.closed.notified().await;
                }
                if request.method() == Method::POST && style.fault == GuestFault::Stall {
                    return std::future::pending().await;
                }
                let mut response = next.run(request).await;
                if response.status() == StatusCode::ACCEPTED && style.fault != GuestFault::None {
                    response = faulty_answer(style.fault);
                }
                if style.close_each {
                    response.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                response
            }
        }
    }));
    let mut connections = tokio::task::JoinSet::new();
    if style.refuse_after_ready.is_zero() {
        return accept(&listener, &app, style, &mut connections, None).await;
    }
    accept(&listener, &app, style, &mut connections, Some(&refusing.probed)).await;
    drop(listener);
    refusing.closed.notify_one();
    tokio::time::sleep(style.refuse_after_ready).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(address).expect("the guest's address is free again");
    let listener = socket.listen(style.backlog).expect("listen");
    accept(&listener, &app, style, &mut connections, None).await;
}

struct Refusing {
    armed: std::sync::atomic::AtomicBool,
    probed: tokio::sync::Notify,
    closed: tokio::sync::Notify,
}

/// Accepts connections (one per `style.accept_every`) into `connections` until `until`
/// is notified (never without it).
async fn accept(
    listener: &TcpListener,
    app: &Router,
    style: GuestStyle,
    connections: &mut tokio::task::JoinSet<()>,
    until: Option<&tokio::sync::Notify>,
) {
    let stop = async {
        match until {
            Some(notify) => notify.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = &mut stop => return,
        };
        let _ = stream.set_nodelay(true);
        let service = crate::api::hyper_service(app.clone());
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
        if !style.accept_every.is_zero() {
            tokio::time::sleep(style.accept_every).await;
        }
    }
}

/// The guest application: accepts CloudEvents with 202 and lists their ids.
/// The 200 a misbehaving guest answers an event with (after logging it).
fn faulty_answer(fault: GuestFault) -> axum::response::Response {
    use futures_util::StreamExt;
    let (length, body) = match fault {
        GuestFault::Trickle(every) => (
            Some(1000),
            axum::body::Body::from_stream(futures_util::stream::iter(0..1000).then(move |_| async move {
                tokio::time::sleep(every).await;
                Ok::<_, std::convert::Infallible>(Bytes::from_static(b"x"))
            })),
        ),
        GuestFault::Oversize(length) => (
            length,
            axum::body::Body::from_stream(futures_util::stream::repeat_with(|| {
                Ok::<_, std::convert::Infallible>(Bytes::from(vec![b'x'; 64 * 1024]))
            })),
        ),
        GuestFault::None | GuestFault::Stall => unreachable!("answered as usual or not at all"),
    };
    let mut response = axum::response::Response::new(body);
    if let Some(length) = length {
        response.headers_mut().insert(
            axum::http::header::CONTENT_LENGTH,
            axum::http::HeaderValue::from(length),
        );
    }
    response
}

fn router(log: GuestLog) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/events",
            get({
                let log = log.clone();
                move || async move { log.lock().unwrap().join("\n") }
            }),
        )
        .fallback(move |method: Method, headers: HeaderMap, body: Bytes| {
            let log = log.clone();
            async move {
                if method != Method::POST {
                    return StatusCode::OK;
                }
                let id = headers
                    .get("ce-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| {
                        serde_json::from_slice::<Value>(&body)
                            .ok()?
                            .get("id")?
                            .as_str()
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                if let Some(traceparent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
                    TRACEPARENTS.lock().unwrap().push((id.clone(), traceparent.to_string()));
                }
                log.lock().unwrap().push(id);
                StatusCode::ACCEPTED
            }
        })
}
