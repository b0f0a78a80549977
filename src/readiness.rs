//! Guest readiness: after the backend reports a VM running with an endpoint, probe the
//! guest (TCP connect, or HTTP GET of a path answering 2xx/3xx) every few milliseconds
//! until it answers. This — not the backend's phase — is "Ready": a VMI without a
//! readinessProbe reports Ready before the guest OS has booted, and QEMU user
//! networking accepts TCP connections long before the guest application listens.
//!
//! Attempts overlap: a new one starts every `interval` while earlier ones are still
//! pending (up to a small bound), because one attempt can hang for a whole TCP
//! retransmit timeout when it races the guest network coming up, and the cold-start
//! overhead must stay within milliseconds of the guest's first answer — for a booting
//! guest. A guest resumed or restored is probed one attempt at a time ([`Attempts`]).
//!
//! Owns: probing. Must not import the lifecycle, activator, backend or ingress.

use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Empty;
use hyper::body::Bytes;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::config::ReadinessConfig;
use crate::vm::{Endpoint, Readiness};

/// At most this many probe attempts outstanding at once (overlapping attempts).
const MAX_PARALLEL_ATTEMPTS: usize = 4;

/// Whether a guest's probe attempts may overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempts {
    /// A new attempt every interval while earlier ones are pending (up to 4): a booting
    /// guest's network can swallow an attempt for a whole TCP retransmit timeout.
    Overlapping,
    /// One at a time: a guest resumed or restored was serving when it was paused or
    /// saved, so its network is up, and overlapping attempts only compete for its vCPUs
    /// (under TCG each is a connection and a process the guest serves on code it must
    /// translate anew: they made a restore's probe about half again as long).
    OneAtATime,
}

/// Waits until a guest answers: what a VM's owner runs once the backend reports the VM
/// running. [`Prober`] is the real one; tests swap in a scripted one.
#[async_trait]
pub trait GuestProbe: Send + Sync + 'static {
    /// Returns once the guest at `endpoint` answers `readiness`, its attempts made as
    /// `attempts` says. Never returns otherwise: the caller bounds it (start timeout) or
    /// drops it (the VM stopped).
    async fn wait_ready(&self, endpoint: Endpoint, readiness: &Readiness, attempts: Attempts);
}

#[async_trait]
impl GuestProbe for Prober {
    async fn wait_ready(&self, endpoint: Endpoint, readiness: &Readiness, attempts: Attempts) {
        Prober::wait_ready(self, endpoint, readiness, attempts).await
    }
}

/// Probes guests over TCP or HTTP. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Prober {
    config: ReadinessConfig,
}

/// Why one probe attempt failed (for logs).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the attempt timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset, or closed early.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The guest answered with a status outside 200-399.
    #[error("answered {0}")]
    Status(u16),
}

impl Prober {
    /// A prober with these intervals.
    pub fn new(config: ReadinessConfig) -> Prober {
        Prober { config }
    }

    /// Returns once the guest at `endpoint` answers. Never returns otherwise: the
    /// caller bounds it (start timeout) or drops it (the VM stopped).
    pub async fn wait_ready(&self, endpoint: Endpoint, readiness: &Readiness, overlap: Attempts) {
        let outstanding = match overlap {
            Attempts::Overlapping => MAX_PARALLEL_ATTEMPTS,
            Attempts::OneAtATime => 1,
        };
        let mut attempts = JoinSet::new();
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_error = None;
        loop {
            tokio::select! {
                _ = tick.tick(), if attempts.len() < outstanding => {
                    let (config, readiness) = (self.config.clone(), readiness.clone());
                    attempts.spawn(async move { probe_once(&config, endpoint, &readiness).await });
                }
                Some(done) = attempts.join_next() => match done {
                    Ok(Ok(())) => {
                        tracing::debug!(%endpoint, "guest answered its probe");
                        return;
                    }
                    Ok(Err(e)) => {
                        let message = e.to_string();
                        if last_error.as_ref() != Some(&message) {
                            tracing::debug!(%endpoint, error = %message, "guest not ready yet");
                            last_error = Some(message);
                        }
                    }
                    Err(_) => {}
                },
            }
        }
    }

    /// One attempt, bounded by the attempt timeout.
    pub async fn probe(&self, endpoint: Endpoint, readiness: &Readiness) -> Result<(), ProbeError> {
        probe_once(&self.config, endpoint, readiness).await
    }
}

async fn probe_once(config: &ReadinessConfig, endpoint: Endpoint, readiness: &Readiness) -> Result<(), ProbeError> {
    let timeout = config.attempt_timeout;
    let attempt = async {
        let stream = TcpStream::connect(endpoint).await?;
        let Some(path) = readiness.http_path() else {
            return Ok(());
        };
        stream.set_nodelay(true)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, endpoint.to_string())
            .header(hyper::header::USER_AGENT, "vm-activator-probe")
            .body(Empty::<Bytes>::new())
            .expect("static request parts are valid");
        let response = sender.send_request(request).await;
        conn.abort();
        let status = response?.status().as_u16();
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(ProbeError::Status(status))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn prober() -> Prober {
        Prober::new(ReadinessConfig {
            interval: Duration::from_millis(2),
            attempt_timeout: Duration::from_millis(100),
        })
    }

    async fn http_server(status: &'static str) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx_and_rejects_5xx() {
        let ok = http_server("200 OK").await;
        let bad = http_server("503 Service Unavailable").await;
        let http = Readiness::Http("/healthz".into());
        assert!(prober().probe(ok, &http).await.is_ok());
        assert!(matches!(prober().probe(bad, &http).await, Err(ProbeError::Status(503))));
    }

    #[tokio::test]
    async fn tcp_probe_fails_on_refused_connection() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            prober().probe(port, &Readiness::Tcp).await,
            Err(ProbeError::Io(_))
        ));
    }

    #[tokio::test]
    async fn wait_ready_returns_once_the_guest_listens() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let waiter = tokio::spawn(async move {
            prober()
                .wait_ready(addr, &Readiness::HttpRoot, Attempts::Overlapping)
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    /// A guest that answers each connection only after 50 ms (a restored guest
    /// under TCG): overlapping attempts pile up connections on it meanwhile, one at a
    /// time makes exactly one.
    #[tokio::test]
    async fn one_attempt_at_a_time_makes_one_connection_to_a_slow_guest() {
        for (attempts, expect_more_than_one) in [(Attempts::OneAtATime, false), (Attempts::Overlapping, true)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = connections.clone();
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = listener.accept().await.unwrap();
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf).await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                    });
                }
            });
            tokio::time::timeout(
                Duration::from_secs(5),
                prober().wait_ready(addr, &Readiness::HttpRoot, attempts),
            )
            .await
            .expect("the guest answers");
            let made = connections.load(std::sync::atomic::Ordering::SeqCst);
            assert_eq!(made > 1, expect_more_than_one, "{attempts:?}: {made} connections");
        }
    }
}
