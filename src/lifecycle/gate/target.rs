//! The endpoints of a VM that take traffic (one for a VM, the ready pods of a scaled
//! workload), each with its requests in flight and its limit, and how a request picks
//! one: the least loaded with a free slot.
//!
//! The limit adapts (AIMD, as TCP's congestion window): a new endpoint starts at
//! [`INITIAL_LIMIT`] requests in flight; each answered request adds one while the limit
//! is below its threshold (slow start: it doubles per round trip), then one per
//! limit's worth of answers; a connection that could not be made halves it (at most
//! once per round: failures of requests taken before the last cut do not cut again) and
//! sets the threshold there. It never exceeds `concurrency` (or [`UNLIMITED`] for 0),
//! and grows only while it binds, so a warm endpoint's limit settles just above its
//! load and the warm path only reads it. AIMD rather than a gradient limiter: the
//! signal we have is binary (connected or not) and comes late (a connect timeout), and
//! AIMD needs no latency baseline, which a freshly booted guest does not have.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::vm::Endpoint;

/// Requests in flight a newly ready endpoint takes at first (or its `concurrency`, if
/// lower).
pub const INITIAL_LIMIT: usize = 4;

/// The ceiling of the adaptive limit when `concurrency` is 0 (no configured limit).
pub const UNLIMITED: usize = 10_000;

/// One endpoint that passed the activator's probe and takes traffic.
#[derive(Debug)]
pub struct Target {
    endpoint: Endpoint,
    in_flight: AtomicUsize,
    /// The most requests in flight allowed now, in 1..=`max`.
    limit: AtomicUsize,
    /// `concurrency`, or [`UNLIMITED`].
    max: usize,
    /// Below it the limit grows by one per answer, above it by one per limit's worth.
    threshold: AtomicUsize,
    /// Answers counted toward the next step above the threshold.
    credit: AtomicUsize,
    /// Counts the cuts: a failure cuts only if no cut came since its request was taken.
    epoch: AtomicUsize,
}

/// A request's hold on a target: counted in its in-flight requests. Given back when
/// dropped.
pub(in crate::lifecycle) struct Taken {
    pub(in crate::lifecycle) target: Arc<Target>,
    epoch: usize,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.target.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Taken {
    /// The guest answered: the limit may grow. Returns whether it did.
    pub(in crate::lifecycle) fn answered(&self) -> bool {
        self.target.grow()
    }

    /// No connection could be made to the guest: the limit is cut (once per round).
    pub(in crate::lifecycle) fn not_connected(&self) {
        self.target.cut(self.epoch);
    }
}

impl Target {
    /// A target at `endpoint` taking at most `concurrency` requests at once (0 = no
    /// configured limit).
    pub(in crate::lifecycle) fn new(endpoint: Endpoint, concurrency: usize) -> Arc<Target> {
        let max = if concurrency == 0 { UNLIMITED } else { concurrency };
        Arc::new(Target {
            endpoint,
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(INITIAL_LIMIT.min(max)),
            max,
            threshold: AtomicUsize::new(max),
            credit: AtomicUsize::new(0),
            epoch: AtomicUsize::new(0),
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

    /// The requests in flight allowed now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    fn try_take(self: &Arc<Self>) -> Option<Taken> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut current = self.in_flight.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                return None;
            }
            match self
                .in_flight
                .compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        Some(Taken {
            target: self.clone(),
            epoch: self.epoch.load(Ordering::Relaxed),
        })
    }

    /// One more answer: grows the limit if it binds (in flight within half of it).
    fn grow(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit >= self.max || self.in_flight() * 2 < limit {
            return false;
        }
        if limit < self.threshold.load(Ordering::Relaxed) {
            return self
                .limit
                .compare_exchange(limit, limit + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
        }
        if self.credit.fetch_add(1, Ordering::AcqRel) + 1 < limit {
            return false;
        }
        self.credit.store(0, Ordering::Release);
        self.limit
            .compare_exchange(limit, limit + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// A connection failed for a request taken in `epoch`: halves the limit, unless a
    /// cut came since.
    fn cut(&self, epoch: usize) {
        if self
            .epoch
            .compare_exchange(epoch, epoch + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let halved = (self.limit.load(Ordering::Relaxed) / 2).max(1);
        self.limit.store(halved, Ordering::Release);
        self.threshold.store(halved, Ordering::Release);
        self.credit.store(0, Ordering::Release);
        tracing::debug!(endpoint = %self.endpoint, limit = halved, "guest connections failing; limit cut");
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

    #[test]
    fn the_limit_starts_small_grows_on_answers_and_halves_on_connect_failures() {
        let target = Target::new(endpoint(1), 0);
        let mut held: Vec<Taken> = std::iter::from_fn(|| take(std::slice::from_ref(&target))).collect();
        assert_eq!(held.len(), INITIAL_LIMIT, "a new endpoint starts small");
        // Slow start: one more per answer while the limit binds.
        for taken in &held {
            assert!(taken.answered());
        }
        assert_eq!(target.limit(), 2 * INITIAL_LIMIT);
        held.extend(std::iter::from_fn(|| take(std::slice::from_ref(&target))));
        assert_eq!(held.len(), 2 * INITIAL_LIMIT);

        // Every request of this round fails to connect: one cut, not one per failure.
        for taken in &held {
            taken.not_connected();
        }
        assert_eq!(target.limit(), INITIAL_LIMIT);
        held.clear();
        // Above the threshold: one more per limit's worth of answers.
        let round: Vec<Taken> = std::iter::from_fn(|| take(std::slice::from_ref(&target))).collect();
        assert_eq!(round.len(), INITIAL_LIMIT);
        let grew: Vec<bool> = round.iter().map(Taken::answered).collect();
        assert_eq!(grew, [false, false, false, true]);
        assert_eq!(target.limit(), INITIAL_LIMIT + 1);
        // A cut; then a failure of a request taken before it does not cut again.
        let late = take(std::slice::from_ref(&target)).unwrap();
        late.not_connected();
        assert_eq!(target.limit(), 2, "(4 + 1) / 2");
        round[0].not_connected();
        assert_eq!(target.limit(), 2, "(4 + 1) / 2");
        drop((round, late));
        for _ in 0..10 {
            target.cut(target.epoch.load(Ordering::Relaxed));
        }
        assert_eq!(target.limit(), 1, "never below one");
    }

    #[test]
    fn the_limit_grows_only_while_it_binds_and_never_past_concurrency() {
        let target = Target::new(endpoint(1), 6);
        let one = take(std::slice::from_ref(&target)).unwrap();
        assert!(!one.answered(), "1 in flight of 4: not binding");
        let more: Vec<Taken> = std::iter::from_fn(|| take(std::slice::from_ref(&target))).collect();
        assert_eq!(more.len(), 3);
        for taken in more.iter().chain([&one]) {
            taken.answered();
        }
        assert_eq!(target.limit(), 6, "capped at the configured concurrency");
        assert_eq!(
            Target::new(endpoint(2), 2).limit(),
            2,
            "starts at concurrency when lower"
        );
    }
}
