//! Connections to guests, kept per endpoint: our own HTTP/1.1 connections (`conn.rs`),
//! used by whoever holds them — the task serving the request that uses the connection,
//! never a task of the connection's own, never a channel between tasks. A connect error
//! means nothing reached the guest: the request can be retried safely.
//!
//! Idle connections are not read by anyone: one is checked before it is handed out (the
//! socket's readiness tells a guest that closed it), and the pool drops those past
//! the idle timeout — at each check-in, and from a small reaper task that sweeps every
//! endpoint while any connection is idle.
//!
//! The idle connections are kept in shards, one per thread that serves requests (the
//! ingress's worker threads, and one for every other thread): a connection is registered
//! with the runtime of the thread that made it, and handing it to a request on another
//! thread would make each of its reads a wake-up across threads (and would break once
//! that runtime ends). A thread picks its shard once ([`use_shard`]); the bound on idle
//! connections is per endpoint and shard.
//!
//! Owns: connecting (with its timeout), the idle connections and their bounds. Knows
//! nothing of VMs or requests' meaning.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::conn::describe;
pub(super) use super::conn::GuestConn;
use crate::config::ProxyConfig;
use crate::vm::Endpoint;

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
    conn: Box<GuestConn>,
    /// When it was checked in, on the coarse clock: an age compared with a timeout of
    /// seconds needs no more, and it is read twice per request.
    since: Duration,
}

/// The idle connections to every endpoint, of one shard.
type Shard = Mutex<HashMap<Endpoint, Vec<Idle>, foldhash::fast::RandomState>>;

thread_local! {
    /// The shard this thread checks connections in and out of (0 unless it chose one).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes this thread keep its idle connections in shard `index`: called once by each
/// thread that serves requests on a runtime of its own, with an index of its own (a
/// connection, and the timer it keeps, belong to the runtime that made them).
pub fn use_shard(index: usize) {
    SHARD.with(|shard| shard.set(index));
}

/// The idle connections to every endpoint.
pub(super) struct Pool {
    shards: Box<[Shard]>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_endpoint: usize,
    /// Whether the reaper task runs (it ends when nothing is idle).
    reaping: std::sync::atomic::AtomicBool,
}

/// More endpoints than this in the map: sweep out the ones with no usable connection
/// (pods come and go; their addresses must not pile up).
const SWEEP_ABOVE: usize = 256;

impl Pool {
    /// A pool for `threads` threads with shards of their own (1 to `threads`) and shard 0
    /// for every other.
    pub(super) fn new(config: &ProxyConfig, threads: usize) -> Pool {
        let shards = threads + 1;
        Pool {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_idle_per_endpoint: config.pool_max_idle_per_host,
            reaping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The most recently used idle connection to `endpoint` that can take a request now.
    pub(super) fn checkout(&self, endpoint: Endpoint) -> Option<Box<GuestConn>> {
        let mut idle = self.shard().lock().expect("pool lock");
        let list = idle.get_mut(&endpoint)?;
        let now = crate::clock::coarse_monotonic();
        while let Some(mut idle) = list.pop() {
            if now.saturating_sub(idle.since) <= self.idle_timeout && idle.conn.usable() {
                return Some(idle.conn);
            }
            // Closed by the guest, or idle too long: dropped (its socket closed).
        }
        None
    }

    /// Keeps `conn` for the next request to `endpoint`, if there is room. The caller read
    /// its last exchange to the end, and the guest keeps the connection.
    pub(super) fn checkin(self: &Arc<Self>, endpoint: Endpoint, conn: Box<GuestConn>) {
        let mut idle = self.shard().lock().expect("pool lock");
        if idle.len() > SWEEP_ABOVE && !idle.contains_key(&endpoint) {
            idle.retain(|_, list| {
                list.retain_mut(|idle| idle.conn.usable());
                !list.is_empty()
            });
        }
        let list = idle.entry(endpoint).or_default();
        if list.len() < self.max_idle_per_endpoint {
            list.push(Idle {
                conn,
                since: crate::clock::coarse_monotonic(),
            });
        }
        drop(idle);
        self.start_reaper();
    }

    /// Drops every idle connection past the idle timeout or no longer usable. Returns
    /// whether any is left.
    fn sweep(&self) -> bool {
        let now = crate::clock::coarse_monotonic();
        let mut any = false;
        for shard in &self.shards {
            let mut idle = shard.lock().expect("pool lock");
            idle.retain(|_, list| {
                list.retain_mut(|idle| now.saturating_sub(idle.since) <= self.idle_timeout && idle.conn.usable());
                !list.is_empty()
            });
            any |= !idle.is_empty();
        }
        any
    }

    /// This thread's shard (shard 0 if it chose none this pool has).
    fn shard(&self) -> &Shard {
        let index = SHARD.with(Cell::get);
        self.shards.get(index).unwrap_or(&self.shards[0])
    }

    /// Runs the reaper unless it runs already: every half idle timeout (at least a
    /// second) it sweeps, and it ends once nothing is idle.
    fn start_reaper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Release);
            return;
        };
        let every = (self.idle_timeout / 2).max(Duration::from_secs(1));
        let pool: Weak<Pool> = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                if !pool.sweep() {
                    pool.reaping.store(false, Ordering::Release);
                    // A check-in may have come between the sweep and now.
                    if !pool.sweep() || pool.reaping.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
            }
        });
    }

    /// A new connection to `endpoint`, given up at the connect timeout or `deadline`,
    /// whichever is first. Boxed once here: it moves between the pool and the requests
    /// that use it many times.
    pub(super) async fn connect(&self, endpoint: Endpoint, deadline: Instant) -> Result<Box<GuestConn>, ConnectError> {
        let limit = (Instant::now() + self.connect_timeout).min(deadline);
        let stream = match tokio::time::timeout_at(limit, TcpStream::connect(endpoint)).await {
            Err(_) => return Err(ConnectError::Timeout(self.connect_timeout)),
            Ok(Err(e)) => return Err(ConnectError::Refused(describe(&e))),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        Ok(Box::new(GuestConn::new(stream, endpoint)))
    }

    /// Idle connections to `endpoint` (tests).
    #[cfg(test)]
    pub(super) fn idle_count(&self, endpoint: Endpoint) -> usize {
        self.shard()
            .lock()
            .expect("pool lock")
            .get(&endpoint)
            .map_or(0, Vec::len)
    }
}
