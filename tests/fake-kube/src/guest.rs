//! The guest application the simulated clusters boot: a loopback address of its own
//! (bound at once, so nothing else can answer for it, but refusing connections until
//! the guest listens), and an HTTP server that accepts CloudEvents with 202, lists their
//! ids at `GET /events` and answers `GET /healthz`. Public so that tests playing
//! virt-controller or the kubelet against a real API server boot the same guests.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;

/// Event ids one guest accepted, over all its boots.
pub type GuestLog = Arc<Mutex<Vec<String>>>;

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

/// Serves the guest application on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, log: GuestLog) {
    crate::api::serve_router(listener, router(log)).await;
}

/// The guest application: accepts CloudEvents with 202 and lists their ids.
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
                log.lock().unwrap().push(id);
                StatusCode::ACCEPTED
            }
        })
}
