//! The endpoints of a VM that take traffic (one for a VM, the ready pods of a scaled
//! workload), each with its requests in flight and its own concurrency limit, and how a
//! request picks one: the least loaded with a free slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::vm::Endpoint;

/// One endpoint that passed the activator's probe and takes traffic.
#[derive(Debug)]
pub struct Target {
    endpoint: Endpoint,
    in_flight: AtomicUsize,
    /// At most `Policy::concurrency` requests in flight to this endpoint; `None` =
    /// unlimited.
    limiter: Option<Arc<Semaphore>>,
}

/// A request's hold on a target: counted in its in-flight requests, with a slot of its
/// limiter. Given back when dropped.
pub(in crate::lifecycle) struct Taken {
    pub(in crate::lifecycle) target: Arc<Target>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Target {
    /// A target at `endpoint` taking at most `concurrency` requests at once (0 = no limit).
    pub(in crate::lifecycle) fn new(endpoint: Endpoint, concurrency: usize) -> Arc<Target> {
        Arc::new(Target {
            endpoint,
            in_flight: AtomicUsize::new(0),
            limiter: (concurrency > 0).then(|| Arc::new(Semaphore::new(concurrency))),
        })
    }

    /// Where the guest answers.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// Requests in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether this target's requests are limited (so a freed slot may let a held one in).
    pub(in crate::lifecycle) fn is_limited(&self) -> bool {
        self.limiter.is_some()
    }

    fn try_take(self: &Arc<Self>) -> Option<Taken> {
        let slot = match &self.limiter {
            None => None,
            Some(limiter) => Some(limiter.clone().try_acquire_owned().ok()?),
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Taken {
            target: self.clone(),
            _slot: slot,
        })
    }
}

/// Takes a slot on the least loaded target that has one free; `None` if every target is
/// saturated (or there is none). One target (a VM) is taken without comparing.
pub(in crate::lifecycle) fn take(targets: &[Arc<Target>]) -> Option<Taken> {
    match targets {
        [] => None,
        [only] => only.try_take(),
        many => {
            let least = many.iter().min_by_key(|t| t.in_flight())?;
            least.try_take().or_else(|| many.iter().find_map(|t| t.try_take()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16) -> Endpoint {
        Endpoint::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn requests_go_to_the_least_loaded_endpoint() {
        let targets = [Target::new(endpoint(1), 0), Target::new(endpoint(2), 0)];
        let a = take(&targets).unwrap();
        let b = take(&targets).unwrap();
        assert_ne!(a.target.endpoint(), b.target.endpoint(), "spread over both");
        let c = take(&targets).unwrap();
        assert_eq!(c.target.endpoint(), endpoint(1), "a tie goes to the first");
        let d = take(&targets).unwrap();
        assert_eq!(d.target.endpoint(), endpoint(2), "to the one with fewer in flight");
        assert_eq!(targets.iter().map(|t| t.in_flight()).sum::<usize>(), 4);
        drop((a, b, c, d));
        assert!(targets.iter().all(|t| t.in_flight() == 0));
    }

    #[test]
    fn a_saturated_endpoint_is_passed_over_until_every_one_is() {
        let targets = [Target::new(endpoint(1), 1), Target::new(endpoint(2), 1)];
        let a = take(&targets).unwrap();
        let b = take(&targets).unwrap();
        assert_ne!(a.target.endpoint(), b.target.endpoint());
        assert!(take(&targets).is_none(), "both at their limit");
        drop(b);
        assert!(take(&targets).is_some());
        assert!(take(&[]).is_none());
    }
}
