//! A TCP proxy that injects faults between the activator and what it talks to (the API
//! server, a guest): it passes bytes through until told otherwise, then — on every open
//! connection and every new one — black-holes a direction without closing anything (a
//! half-open path: a load balancer that forgot the flow, a dropped conntrack entry),
//! delays every chunk, trickles one byte at a time, or cuts every open connection.
//! Healing resumes the held bytes where they stopped, as a path that comes back does.
//!
//! Tests put it in front of the real API server; the fake cluster puts one in front of
//! every guest when `Options::guest_behind_proxy` is set (`FakeKube::guest_proxy`).
//!
//! Owns: its listener, one task per direction of each connection. Imports nothing of the
//! activator: it only moves bytes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which way bytes flow: `Up` from the client (the activator) to the target, `Down` back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → target.
    Up,
    /// Target → client.
    Down,
}

/// What the proxy does to the bytes of every connection, old and new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bytes pass at once.
    None,
    /// Nothing moves in `direction` (or either, with `None`); connections stay open and
    /// new ones are accepted. The bytes wait in the proxy and the kernel's buffers.
    BlackHole(Option<Direction>),
    /// Every chunk waits this long before it is passed on.
    Delay(Duration),
    /// Bytes from the target come one at a time, this far apart (a guest answering one
    /// byte a second).
    Trickle(Duration),
}

impl Fault {
    fn holds(self, direction: Direction) -> bool {
        matches!(self, Fault::BlackHole(None)) || self == Fault::BlackHole(Some(direction))
    }
}

/// A running proxy; dropping it closes its listener and every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Bumped by [`FaultProxy::cut`]: connections older than the bump close.
    cuts: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        FaultProxy::on(listener, target)
    }

    /// Forwards every connection `listener` accepts to `target`.
    pub fn on(listener: TcpListener, target: SocketAddr) -> FaultProxy {
        let addr = listener.local_addr().unwrap();
        let (fault, _) = watch::channel(Fault::None);
        let (cuts, _) = watch::channel(0u64);
        let task = tokio::spawn(accept(listener, target, fault.subscribe(), cuts.subscribe()));
        FaultProxy {
            addr,
            fault,
            cuts,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `fault` to every connection from now on (`Fault::None` heals).
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Closes every open connection (new ones are accepted as the fault says).
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, fault: watch::Receiver<Fault>, cuts: watch::Receiver<u64>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (fault, mut cuts) = (fault.clone(), cuts.clone());
        cuts.mark_unchanged();
        connections.spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pump(client_read, server_write, Direction::Up, fault.clone());
            let down = pump(server_read, client_write, Direction::Down, fault);
            // Either side closing ends that direction; a cut ends both at once.
            tokio::select! {
                _ = async { tokio::join!(up, down) } => {}
                _ = cuts.changed() => {}
            }
        });
        // Finished connections are reaped as new ones come.
        while connections.try_join_next().is_some() {}
    }
}

/// Moves bytes `from` → `to` as the current fault allows, until `from` ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A black-holed direction reads nothing: the sender's bytes stay in the kernel's
        // buffers, as they would in front of a path that stopped moving them.
        if fault.wait_for(|f| !f.holds(direction)).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            // A fault set while the chunk was read applies to it too.
            if fault.wait_for(|f| !f.holds(direction)).await.is_err() {
                return;
            }
            let current = *fault.borrow();
            let take = match current {
                Fault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    chunk.len()
                }
                Fault::Trickle(every) if direction == Direction::Down => {
                    tokio::time::sleep(every).await;
                    1
                }
                _ => chunk.len(),
            };
            if to.write_all(&chunk[..take]).await.is_err() {
                return;
            }
            chunk = &chunk[take..];
        }
    }
}
