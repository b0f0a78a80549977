//! The door of a VM's gate: the lock-free warm path, held requests' places against the
//! per-VM bounds, and the [`Permit`] a request holds while it is in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::time::Instant;

use super::{take, Gate, Taken};
use crate::lifecycle::AdmitError;
use crate::vm::{Endpoint, VmPhase};

/// A request's place among the VM's held requests (count and body bytes), given back
/// when dropped.
pub(in crate::lifecycle) struct HeldTicket {
    gate: Gate,
    bytes: usize,
}

/// What the owner hands a held request when it may go in: a slot on one endpoint, and
/// the cold start it waited for, if it waited for one.
pub(in crate::lifecycle) struct Release {
    pub(in crate::lifecycle) taken: Taken,
    pub(in crate::lifecycle) cold: Option<Arc<ColdStart>>,
}

/// The timeline of one cold start, as the owner saw it: what a held request's trace
/// shows it waited on.
#[derive(Debug)]
pub struct ColdStart {
    /// Its phases in order: `start call`, then `boot` or `resume` (a `restore` is one
    /// phase: it happens inside the call), then `probe`.
    pub phases: Vec<ColdStartPhaseSpan>,
}

/// One phase of a cold start: a name and when it began and ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColdStartPhaseSpan {
    /// `start call`, `boot`, `resume`, `restore` or `probe`.
    pub name: &'static str,
    /// When it began.
    pub from: Instant,
    /// When it ended.
    pub to: Instant,
}

/// How a request that was held got in.
#[derive(Debug)]
pub struct Held {
    /// When it began to wait.
    pub since: Instant,
    /// The cold start it waited for (`None`: it waited for a slot or a re-probe).
    pub cold: Option<Arc<ColdStart>>,
}

impl Gate {
    /// The warm path: when Ready with nothing held and a slot free on an endpoint, the
    /// request goes straight to the least loaded one. Lock-free: the owner is not
    /// involved.
    pub(in crate::lifecycle) fn try_enter(&self) -> Option<Permit> {
        // Count first, then look: `GateTx::close_if_idle` checks the count under the
        // state's write lock, so either it sees this request or this request sees the
        // gate closed.
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        let taken = {
            let state = self.0.state.borrow();
            if state.phase == VmPhase::Ready && !self.has_held() {
                take(&state.targets)
            } else {
                None
            }
        };
        match taken {
            Some(taken) => Some(self.entered(taken, None)),
            None => {
                self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
                None
            }
        }
    }

    /// Counts a request already counted in `in_flight` as entered.
    fn entered(&self, taken: Taken, held: Option<Held>) -> Permit {
        self.0.metrics.series().in_flight.inc();
        self.touch();
        Permit {
            gate: self.clone(),
            taken: Some(taken),
            held: held.map(Box::new),
        }
    }

    /// Reserves a held request's place against the VM's bounds (count and body bytes).
    pub(in crate::lifecycle) fn reserve(&self, body_bytes: usize) -> Result<HeldTicket, AdmitError> {
        let policy = self.policy();
        let mut held = self.lock_held();
        if held.count + 1 > policy.max_buffered || held.bytes + body_bytes > policy.max_buffered_bytes {
            return Err(AdmitError::BufferFull {
                count: held.count,
                bytes: held.bytes,
                max_count: policy.max_buffered,
                max_bytes: policy.max_buffered_bytes,
            });
        }
        held.count += 1;
        held.bytes += body_bytes;
        self.0.held_count.store(held.count, Ordering::SeqCst);
        self.set_buffered_metric(held.count);
        Ok(HeldTicket {
            gate: self.clone(),
            bytes: body_bytes,
        })
    }

    /// A held request (waiting `since`) was released by the owner: it is in flight from
    /// now on, and its place among the held requests is given back (in that order, so the
    /// idle check never sees it in neither).
    pub(in crate::lifecycle) fn admit_released(&self, ticket: HeldTicket, release: Release, since: Instant) -> Permit {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        let held = Held {
            since,
            cold: release.cold,
        };
        let permit = self.entered(release.taken, Some(held));
        drop(ticket);
        permit
    }
}

impl Drop for HeldTicket {
    fn drop(&mut self) {
        let mut held = self.gate.lock_held();
        held.count -= 1;
        held.bytes -= self.bytes;
        self.gate.0.held_count.store(held.count, Ordering::SeqCst);
        self.gate.set_buffered_metric(held.count);
    }
}

/// One request in flight to the guest. Dropping it records activity and frees its
/// endpoint's slot; keep it alive until the response body has been streamed.
pub struct Permit {
    gate: Gate,
    /// Always `Some` until dropped (taken out first there, so the slot is free before
    /// the owner is told).
    taken: Option<Taken>,
    /// Boxed: a permit is part of every response body (and so of every HTTP/2 stream's
    /// task), and most requests were never held.
    held: Option<Box<Held>>,
}

impl Permit {
    fn taken(&self) -> &Taken {
        self.taken.as_ref().expect("a permit holds its slot until dropped")
    }

    /// Where to send the request.
    pub fn endpoint(&self) -> Endpoint {
        self.taken().target.endpoint()
    }

    /// Whether the request was held (it waited for a start or a slot) before it got in.
    pub fn was_held(&self) -> bool {
        self.held.is_some()
    }

    /// How the request got in when it was held: since when, and the cold start it
    /// waited for (for its trace).
    pub fn held(&self) -> Option<&Held> {
        self.held.as_deref()
    }

    /// The guest answered: its endpoint may take more requests at once (and held ones
    /// may go in now).
    pub fn answered(&self) {
        if self.taken().answered() && self.gate.has_held() {
            self.gate.0.slot_freed.notify_one();
        }
    }

    /// No connection to the guest could be made: its endpoint takes fewer at once.
    pub fn not_connected(&self) {
        self.taken().not_connected();
    }
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("vm", self.gate.key())
            .field("endpoint", &self.endpoint())
            .field("held", &self.held)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // The slot first: the owner, woken below, must find it free.
        drop(self.taken.take());
        self.gate.touch();
        self.gate.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.gate.0.metrics.series().in_flight.dec();
        if self.gate.has_held() {
            self.gate.0.slot_freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::gate::tests::{addr, gate_with};
    use crate::lifecycle::gate::Target;
    use crate::vm::Policy;

    #[tokio::test(start_paused = true)]
    async fn held_requests_are_bounded_by_count_and_bytes() {
        let (gate, _tx) = gate_with(Policy {
            max_buffered: 3,
            max_buffered_bytes: 100,
            ..Policy::default()
        });
        let a = gate.reserve(60).unwrap();
        assert!(matches!(
            gate.reserve(50),
            Err(AdmitError::BufferFull { bytes: 60, .. })
        ));
        let _b = gate.reserve(40).unwrap();
        let _c = gate.reserve(0).unwrap();
        assert!(matches!(gate.reserve(0), Err(AdmitError::BufferFull { count: 3, .. })));
        drop(a);
        assert_eq!(gate.held(), (2, 40));
        assert!(gate.reserve(0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_warm_path_needs_ready_nothing_held_and_a_free_slot() {
        let (gate, tx) = gate_with(Policy {
            concurrency: 1,
            ..Policy::default()
        });
        assert!(gate.try_enter().is_none(), "stopped");
        tx.publish(VmPhase::Ready, &[Target::new(addr(), 1)], None);
        let ticket = gate.reserve(0).unwrap();
        assert!(gate.try_enter().is_none(), "held requests go first");
        drop(ticket);
        let first = gate.try_enter().expect("warm");
        assert_eq!((first.endpoint(), gate.in_flight()), (addr(), 1));
        assert!(gate.try_enter().is_none(), "the only slot is taken");
        assert_eq!(gate.in_flight(), 1, "a refused request is not counted");
        drop(first);
        assert_eq!(gate.in_flight(), 0);
        assert!(gate.last_activity_if_any().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_request_is_in_flight_before_it_stops_counting_as_held() {
        let (gate, _tx) = gate_with(Policy::default());
        let ticket = gate.reserve(5).unwrap();
        let slot = take(&[Target::new(addr(), 0)]).unwrap();
        let release = Release {
            taken: slot,
            cold: None,
        };
        let permit = gate.admit_released(ticket, release, Instant::now());
        assert_eq!((gate.in_flight(), gate.held()), (1, (0, 0)));
        drop(permit);
        assert_eq!(gate.in_flight(), 0);
    }
}
