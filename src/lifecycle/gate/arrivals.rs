//! What the gate keeps for the adaptive idle policy: the last arrival, whether an arrival
//! ends an idle period (one relaxed load for a VM that does not learn), whether the VM
//! was started ahead of an event that has not come, and which shared activity records
//! are a peer's.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::Gate;

impl Gate {
    /// When the last request arrived, while the VM learns its idle times (the adaptive
    /// policy counts from there).
    pub fn last_arrival_if_any(&self) -> Option<Instant> {
        match self.0.last_arrival_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.0.clock_base + Duration::from_millis(ms - 1)),
        }
    }

    /// Whether a shared activity record `at` may be a peer's: it is later than anything
    /// this replica shared itself.
    pub(in crate::lifecycle) fn is_peer_record(&self, at: SystemTime) -> bool {
        let ms = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        ms > self.0.last_shared_wall_ms.load(Ordering::Relaxed)
    }

    /// How often this replica shares its activity.
    pub(in crate::lifecycle) fn share_every(&self) -> Duration {
        Duration::from_millis(self.0.share_every_ms.load(Ordering::Relaxed))
    }

    /// An arrival, for the adaptive idle policy (one relaxed load when the VM does not
    /// learn): `Some(last)` when it ends an idle period here — more than one bin since the
    /// last arrival (at `last`; `None`: none here yet), nothing in flight or held — and
    /// `None` within an activity period.
    pub(in crate::lifecycle) fn note_arrival(&self) -> Option<Option<Instant>> {
        let bin = self.0.sample_bin_ms.load(Ordering::Relaxed);
        if bin == 0 {
            return None;
        }
        let now = self.since_base_ms() + 1;
        let previous = self.0.last_arrival_ms.fetch_max(now, Ordering::Relaxed);
        if self.in_flight() > 0 || self.has_held() {
            return None;
        }
        if previous != 0 && now.saturating_sub(previous) <= bin {
            return None;
        }
        Some((previous != 0).then(|| self.0.clock_base + Duration::from_millis(previous - 1)))
    }

    /// Whether the VM was started ahead of an event that has not come yet — and from now
    /// on, not.
    pub(in crate::lifecycle) fn take_prewarm(&self) -> bool {
        self.0.prewarmed.load(Ordering::Relaxed) && self.0.prewarmed.swap(false, Ordering::Relaxed)
    }

    /// The VM learns its idle times in bins of `bin` (`None`: it does not).
    pub(in crate::lifecycle) fn set_learning(&self, bin: Option<Duration>) {
        let ms = bin.map_or(0, |b| b.as_millis().max(1) as u64);
        self.0.sample_bin_ms.store(ms, Ordering::Relaxed);
    }
}
