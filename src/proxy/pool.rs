//! Connections to guests, kept per endpoint: HTTP/1.1 connections made with hyper's
//! `client::conn`, each driven by a task of its own, and the idle ones kept for the next
//! request. Driving the connections ourselves (instead of hyper-util's pooled client)
//! is what tells "no byte of the request reached the guest" apart from a failure after
//! it was sent: a connect error, or a pooled connection that closed before the request
//! was written (hyper hands the request back), can be retried safely.
//!
//! Owns: connecting (with its timeout), the idle connections and their bounds. Knows
//! nothing of VMs or requests' meaning.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::ProxyConfig;
use crate::vm::Endpoint;

/// A connection's request side.
pub(super) type Sender = SendRequest<Full<Bytes>>;

/// Why no connection could be made; nothing was sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// Refused or reset while connecting: nothing listens there (yet, or any more).
    #[error("connection refused: {0}")]
    Refused(String),
    /// No answer to the connection attempt in time (e.g. the guest's listen backlog is
    /// full and the kernel drops the SYNs).
    #[error("no connection within {0:?}")]
    Timeout(Duration),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// The idle connections to every endpoint.
pub(super) struct Pool {
    idle: Mutex<HashMap<Endpoint, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_endpoint: usize,
}

/// More endpoints than this in the map: sweep out the ones with no live connection
/// (pods come and go; their addresses must not pile up).
const SWEEP_ABOVE: usize = 256;

impl Pool {
    pub(super) fn new(config: &ProxyConfig) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle_per_endpoint: config.pool_max_idle_per_host,
        }
    }

    /// The most recently used idle connection to `endpoint` that can take a request now.
    pub(super) fn checkout(&self, endpoint: Endpoint) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(&endpoint)?;
        let now = Instant::now();
        let mut found = None;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let conn = &list[i];
            if conn.sender.is_closed() || now.duration_since(conn.since) > self.idle_timeout {
                list.swap_remove(i);
            } else if conn.sender.is_ready() {
                found = Some(list.swap_remove(i).sender);
                break;
            }
            // Not ready yet (its last response is still being finished): left for later.
        }
        found
    }

    /// Keeps `sender` for the next request to `endpoint`, if it is still open and there
    /// is room.
    pub(super) fn checkin(&self, endpoint: Endpoint, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() > SWEEP_ABOVE && !idle.contains_key(&endpoint) {
            idle.retain(|_, list| {
                list.retain(|conn| !conn.sender.is_closed());
                !list.is_empty()
            });
        }
        let list = idle.entry(endpoint).or_default();
        if list.len() < self.max_idle_per_endpoint {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// A new connection to `endpoint`, given up at the connect timeout or `deadline`,
    /// whichever is first.
    pub(super) async fn connect(&self, endpoint: Endpoint, deadline: Instant) -> Result<Sender, ConnectError> {
        let limit = (Instant::now() + self.connect_timeout).min(deadline);
        let stream = match tokio::time::timeout_at(limit, TcpStream::connect(endpoint)).await {
            Err(_) => return Err(ConnectError::Timeout(self.connect_timeout)),
            Ok(Err(e)) => return Err(ConnectError::Refused(describe(&e))),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        // The handshake of HTTP/1 does no I/O: it cannot fail for the network's reasons.
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Refused(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%endpoint, %error, "guest connection ended");
            }
        });
        Ok(sender)
    }
}

fn describe(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        _ => e.to_string(),
    }
}
