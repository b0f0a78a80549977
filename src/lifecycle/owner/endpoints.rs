//! The endpoints of a running VM as its owner tracks them: those taking traffic (they
//! passed the activator's probe), and those being probed — new ones the backend
//! reported, or ones taken out after refusing a connection. Each probe runs as a task of
//! its own; the owner learns when one passes.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::{AbortHandle, JoinSet};

use crate::lifecycle::gate::Target;
use crate::readiness::{Attempts, GuestProbe};
use crate::vm::{Endpoint, Readiness};

/// How endpoints are probed.
pub(super) struct Probing {
    pub(super) probe: Arc<dyn GuestProbe>,
    pub(super) readiness: Readiness,
    /// Whether attempts may overlap (not for a guest resumed or restored: see
    /// `Attempts`).
    pub(super) attempts: Attempts,
}

#[derive(Default)]
pub(super) struct Endpoints {
    /// Taking traffic, in the order they passed their probe.
    ready: Vec<Arc<Target>>,
    /// Being probed.
    probing: HashMap<Endpoint, AbortHandle>,
    probes: JoinSet<Endpoint>,
}

impl Endpoints {
    /// The endpoints taking traffic.
    pub(super) fn ready(&self) -> &[Arc<Target>] {
        &self.ready
    }

    /// Whether any endpoint takes traffic.
    pub(super) fn any_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether a probe is running.
    pub(super) fn probing(&self) -> bool {
        !self.probing.is_empty()
    }

    /// Makes `wanted` (what the backend reports) the endpoints: those no longer reported
    /// leave at once, new ones are probed before they take traffic. Returns whether the
    /// endpoints taking traffic changed.
    pub(super) fn sync(&mut self, wanted: &[Endpoint], how: &Probing) -> bool {
        let before = self.ready.len();
        self.ready.retain(|t| wanted.contains(&t.endpoint()));
        self.probing.retain(|endpoint, task| {
            let keep = wanted.contains(endpoint);
            if !keep {
                task.abort();
            }
            keep
        });
        for endpoint in wanted {
            let known = self.probing.contains_key(endpoint) || self.ready.iter().any(|t| t.endpoint() == *endpoint);
            if !known {
                self.start_probe(*endpoint, how);
            }
        }
        self.ready.len() != before
    }

    /// Takes `endpoint` out of the traffic and probes it again (it refused a
    /// connection). Returns whether it was taking traffic.
    pub(super) fn reprobe(&mut self, endpoint: Endpoint, how: &Probing) -> bool {
        let before = self.ready.len();
        self.ready.retain(|t| t.endpoint() != endpoint);
        if before == self.ready.len() {
            return false;
        }
        self.start_probe(endpoint, how);
        true
    }

    /// `endpoint`'s probe passed: it takes traffic (with this concurrency limit) from
    /// now on. False if it was dropped meanwhile.
    pub(super) fn passed(&mut self, endpoint: Endpoint, concurrency: usize) -> bool {
        if self.probing.remove(&endpoint).is_none() {
            return false;
        }
        self.ready.push(Target::new(endpoint, concurrency));
        true
    }

    /// Resolves with the next endpoint whose probe passed; never while nothing is probed.
    pub(super) async fn next_passed(&mut self) -> Endpoint {
        loop {
            match self.probes.join_next().await {
                Some(Ok(endpoint)) => return endpoint,
                // Aborted (dropped meanwhile): wait for the next.
                Some(Err(_)) => continue,
                None => std::future::pending().await,
            }
        }
    }

    /// Stops every probe; the endpoints taking traffic stay (a stop may be called off).
    pub(super) fn stop_probing(&mut self) {
        self.probing.clear();
        self.probes.abort_all();
    }

    /// Forgets every endpoint (the VM stopped).
    pub(super) fn clear(&mut self) {
        self.stop_probing();
        self.ready.clear();
    }

    fn start_probe(&mut self, endpoint: Endpoint, how: &Probing) {
        let (probe, readiness, attempts) = (how.probe.clone(), how.readiness.clone(), how.attempts);
        let task = self.probes.spawn(async move {
            probe.wait_ready(endpoint, &readiness, attempts).await;
            endpoint
        });
        self.probing.insert(endpoint, task);
    }
}
