//! The fake guest: a loopback address of its own, the wait for its "boot", and the
//! HTTP server standing in for the guest application.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::{FakeOptions, GuestLog};

/// Waits until `at` on a thread of its own (so not on the runtime's timer grid). The
/// thread is detached: a VM stopped meanwhile only leaves it to finish its sleep.
pub(super) async fn sleep_precisely_until(at: Instant) {
    let wait = at.saturating_duration_since(Instant::now());
    let (done, woken) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        std::thread::sleep(wait);
        let _ = done.send(());
    });
    let _ = woken.await;
}

/// Guest addresses handed out so far in this process.
static NEXT_GUEST: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Binds (without listening) the next free guest address, skipping any that another
/// process holds.
pub(super) fn reserve_guest_socket() -> std::io::Result<tokio::net::TcpSocket> {
    let mut last_error = None;
    for _ in 0..1024 {
        let n = NEXT_GUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ip = std::net::Ipv4Addr::new(127, 2, (n / 254 % 256) as u8, (n % 254 + 1) as u8);
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        match socket.bind(SocketAddr::from((ip, 8080))) {
            Ok(()) => return Ok(socket),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.expect("tried at least once"))
}

/// Serves the fake guest application until the task is aborted. Each connection holds a
/// clone of `alive` until it is closed.
pub(super) async fn serve_guest(
    listener: TcpListener,
    log: Arc<Mutex<GuestLog>>,
    options: Arc<Mutex<FakeOptions>>,
    alive: Arc<()>,
) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let log = log.clone();
        let options = options.clone();
        let alive = alive.clone();
        // Connections live in this task's JoinSet, so aborting the VM closes them too.
        connections.spawn(async move {
            let _alive = alive;
            let service = hyper::service::service_fn(move |req| guest_handle(req, log.clone(), options.clone()));
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn guest_handle(
    req: Request<Incoming>,
    log: Arc<Mutex<GuestLog>>,
    options: Arc<Mutex<FakeOptions>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, body: Bytes| {
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        Ok(resp)
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => reply(200, Bytes::from_static(b"ok")),
        ("GET", "/events") => {
            let ids = log.lock().expect("log lock").event_ids.join("\n");
            reply(200, Bytes::from(ids))
        }
        ("GET", _) => reply(200, Bytes::new()),
        ("POST", _) => {
            let (delay, status) = {
                let o = options.lock().expect("options lock");
                (o.response_delay, o.response_status)
            };
            let path = req.uri().path().to_string();
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let header_id = req
                .headers()
                .get("ce-id")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return reply(400, Bytes::new()),
            };
            let id = header_id.or_else(|| {
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string))
            });
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if (200..300).contains(&status) {
                let mut log = log.lock().expect("log lock");
                log.event_ids.push(id.unwrap_or_default());
                log.paths.push(path);
                log.last_headers = headers;
                log.last_body = body;
            }
            reply(status, Bytes::new())
        }
        _ => reply(405, Bytes::new()),
    }
}
