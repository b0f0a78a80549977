//! Whether the Kubernetes API can be written to. A start, stop or patch that fails at
//! the connection level (refused, reset, timed out — not an answer with an error status)
//! marks the backend degraded: `/readyz` fails and events for VMs that are not Ready are
//! answered 503 at once, instead of each waiting out its start timeout on a dead API.
//! While degraded, one cheap round trip (`GET /version`) a second says when it is back.
//! The watches alone cannot tell: a terminating kube-apiserver keeps open watches open
//! for a long time while it refuses new requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;
use std::time::Duration;

use super::KubevirtBackend;

/// How often a degraded backend tries the API again.
pub(super) const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// The write path's health.
#[derive(Default)]
pub(super) struct WriteHealth {
    degraded: AtomicBool,
}

impl WriteHealth {
    /// Whether a write failed at the connection level and no round trip succeeded since.
    pub(super) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }

    /// A write could not reach the API server.
    pub(super) fn failed(&self, error: &kube::Error) {
        if !self.degraded.swap(true, Ordering::SeqCst) {
            tracing::warn!(%error, "Kubernetes API unreachable for writes; /readyz fails until it answers again");
        }
    }
}

/// Whether `error` says the request never got an answer (rather than an error answer).
pub(super) fn is_connection_level(error: &kube::Error) -> bool {
    matches!(error, kube::Error::HyperError(_) | kube::Error::Service(_))
}

/// While the backend lives: when it is degraded, tries the API every [`RECHECK_EVERY`]
/// until it answers (a healthy backend costs one atomic load a second).
pub(super) async fn recheck(backend: Weak<KubevirtBackend>) {
    loop {
        tokio::time::sleep(RECHECK_EVERY).await;
        let Some(strong) = backend.upgrade() else {
            return;
        };
        if !strong.write_health.is_degraded() {
            continue;
        }
        // Any answer is a round trip, an error status included (the fake and some
        // proxies answer /version with 404); a 5xx is a server still going away.
        let answered = match strong.client.apiserver_version().await {
            Ok(_) => true,
            Err(kube::Error::Api(status)) => status.code < 500,
            Err(_) => false,
        };
        if answered {
            strong.write_health.degraded.store(false, Ordering::SeqCst);
            tracing::info!("Kubernetes API answers again");
        }
    }
}
