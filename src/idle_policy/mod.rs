//! When an idle target is scaled down, and when it is started again ahead of its next
//! event: the fixed idle timeout, or the adaptive policy learned from the target's own
//! history of idle times.
//!
//! Time is measured from the target's last arrival (its last event's). A *gap* is the
//! time from there to the next arrival, when nothing was in flight or held between:
//! a periodic sender's gaps are its period, whether its events found the target cold or
//! warm. Gaps are counted in bins of `bin` (`history.rs`): a gap of at most one bin is
//! part of the same activity period, so a target is always kept up for at least one bin
//! after an arrival (and, whatever the plan, while a request is in flight or held). A
//! *plan* (`plan.rs`) is a list of windows — "be ready from here, keep running until
//! there" — chosen where the cold starts they are expected to save are worth their
//! running time.
//!
//! The owner of each target (its timers) and `vm-activator simulate` (simulated time)
//! both call [`Plan::adaptive`] / [`Plan::fixed`] and [`Plan::step`]: the simulator runs
//! this code, not a copy.
//!
//! `kernel.rs` smooths a history's counts for a plan.
//!
//! Owns: the history (and its annotation text), the plan, the policy's settings. Pure:
//! no clock, no I/O, no async. Must not import any other module of this crate.

mod history;
mod kernel;
mod plan;

pub use history::{History, HistoryError, HISTORY_ANNOTATION, MAX_SAMPLES};
pub use plan::{Plan, Step, Window};

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which idle policy a target runs under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdlePolicy {
    /// Scale down after `idle_timeout` without activity; start only for an event.
    #[default]
    Fixed,
    /// Learned from the target's idle times: scale down early, start again just before
    /// the next event is expected; `idle_timeout` until enough is learned.
    Adaptive,
}

impl IdlePolicy {
    /// The value as in config and annotations.
    pub fn as_str(self) -> &'static str {
        match self {
            IdlePolicy::Fixed => "fixed",
            IdlePolicy::Adaptive => "adaptive",
        }
    }
}

impl fmt::Display for IdlePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdlePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fixed" => Ok(IdlePolicy::Fixed),
            "adaptive" => Ok(IdlePolicy::Adaptive),
            _ => Err("expected fixed or adaptive".into()),
        }
    }
}

/// The adaptive policy's settings (config section `idle.adaptive`). Every bound is in
/// bins of `bin`, so a test with 1 s bins is a miniature of the real thing at 1 min.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Width of one histogram bin: the resolution of every decision.
    pub bin: Duration,
    /// Longest gap the histogram tells apart; longer ones are counted as "out of range".
    pub range: Duration,
    /// A target is never scaled down sooner than this after its last activity (at least
    /// one bin: the end of an activity period).
    pub min_keep_alive: Duration,
    /// No window (keep-alive or pre-warm) reaches further than this from the last
    /// activity.
    pub max_keep_alive: Duration,
    /// What one cold start is worth in running time: a window is kept only where the
    /// cold starts it is expected to save are worth the time it runs.
    pub cold_start_cost: Duration,
    /// Fewer idle periods than this in the history: the fixed idle timeout applies.
    pub min_samples: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bin: Duration::from_secs(60),
            range: Duration::from_secs(4 * 3600),
            min_keep_alive: Duration::from_secs(60),
            max_keep_alive: Duration::from_secs(4 * 3600),
            cold_start_cost: Duration::from_secs(50 * 60),
            min_samples: 3,
        }
    }
}

/// The most bins a histogram may have (`range / bin`): bounds the annotation's size
/// and the work of one decision.
pub const MAX_BINS: u32 = 1440;

impl Settings {
    /// Bins in the histogram's range.
    pub fn bins(&self) -> u32 {
        (self.range.as_nanos() / self.bin.as_nanos().max(1)).clamp(2, MAX_BINS as u128) as u32
    }

    /// Why these settings cannot be used, naming the key (relative to `idle.adaptive`).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.bin < Duration::from_millis(100) {
            return Err(("bin", "must be at least 100ms".into()));
        }
        let bins = self.range.as_nanos() / self.bin.as_nanos();
        if !(2..=MAX_BINS as u128).contains(&bins) {
            return Err((
                "range",
                format!("must be 2 to {MAX_BINS} bins of {:?} (it is {bins})", self.bin),
            ));
        }
        if self.min_keep_alive < self.bin {
            return Err(("min_keep_alive", "must be at least one bin".into()));
        }
        if self.max_keep_alive < self.min_keep_alive {
            return Err(("max_keep_alive", "must be at least min_keep_alive".into()));
        }
        if self.cold_start_cost < self.bin {
            return Err(("cold_start_cost", "must be at least one bin".into()));
        }
        if self.min_samples == 0 {
            return Err(("min_samples", "must be at least 1".into()));
        }
        Ok(())
    }

    /// How far ahead of a window a target whose cold start takes `cold_start` is started:
    /// that plus a quarter bin, for the cold start's own variation.
    pub fn lead(&self, cold_start: Duration) -> Duration {
        cold_start + self.bin / 4
    }

    /// `d` in bins (fractional).
    fn in_bins(&self, d: Duration) -> f64 {
        d.as_secs_f64() / self.bin.as_secs_f64()
    }
}
