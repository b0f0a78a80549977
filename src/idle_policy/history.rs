//! A target's history of idle times: how many of its idle periods ended in each bin,
//! how many were longer than the range, its last arrival, and how long its cold start
//! takes — and the compact text it is kept in (the annotation
//! `vm-activator.io/idle-history`, or a file of the local backend):
//!
//! ```text
//! v1 bin=60s at=1764905359123 cold=4200ms oob=3 gaps=1:27,14:5,59:12
//! ```
//!
//! `at` (Unix milliseconds) and `cold` are optional; `gaps` lists `bin:count` pairs.
//! Bounded: at most [`MAX_BINS`] bins, and counts are halved once they reach
//! [`MAX_SAMPLES`] together, so older idle times weigh less as newer ones come.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Settings, MAX_BINS};

/// The annotation a target's idle history is kept in.
pub const HISTORY_ANNOTATION: &str = "vm-activator.io/idle-history";

/// Once the counts reach this many together, they are halved.
pub const MAX_SAMPLES: u32 = 512;

/// Why a history text could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("idle history {0}")]
pub struct HistoryError(String);

/// A target's idle times, in bins (see the module header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct History {
    bin: Duration,
    /// Idle periods per bin: bin `k` holds gaps in `(k, k + 1]` bins; `k ≥ 1`.
    gaps: BTreeMap<u32, u32>,
    /// Idle periods longer than the range.
    out_of_range: u32,
    /// The last arrival (when the plan counts from), as last written.
    last_activity: Option<SystemTime>,
    /// How long the target's cold start takes (its last one).
    cold_start: Option<Duration>,
}

/// The bin of a gap: `ceil(gap / bin) - 1`, so a gap of at most one bin is bin 0 — part
/// of the same activity period, not an idle period.
fn bin_of(gap: Duration, bin: Duration) -> u64 {
    let (gap, bin) = (gap.as_nanos(), bin.as_nanos().max(1));
    (gap.div_ceil(bin).saturating_sub(1)).min(u64::MAX as u128) as u64
}

impl History {
    /// An empty history with bins of `bin`.
    pub fn new(bin: Duration) -> History {
        History {
            bin,
            gaps: BTreeMap::new(),
            out_of_range: 0,
            last_activity: None,
            cold_start: None,
        }
    }

    /// The bin width the history was recorded with.
    pub fn bin(&self) -> Duration {
        self.bin
    }

    /// Idle periods recorded (after halving).
    pub fn samples(&self) -> u32 {
        self.gaps.values().sum::<u32>() + self.out_of_range
    }

    /// Idle periods longer than the range.
    pub fn out_of_range(&self) -> u32 {
        self.out_of_range
    }

    /// Idle periods per bin (`bin ≥ 1`), in order.
    pub fn gaps(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.gaps.iter().map(|(k, n)| (*k, *n))
    }

    /// The last arrival, as last recorded.
    pub fn last_activity(&self) -> Option<SystemTime> {
        self.last_activity
    }

    /// How long the target's last cold start took, as last recorded.
    pub fn cold_start(&self) -> Option<Duration> {
        self.cold_start
    }

    /// Records the last arrival.
    pub fn set_last_activity(&mut self, at: SystemTime) {
        self.last_activity = Some(at);
    }

    /// Records how long a cold start took.
    pub fn set_cold_start(&mut self, took: Duration) {
        self.cold_start = Some(took);
    }

    /// Records one gap between two arrivals. Returns whether it was an idle period
    /// (longer than one bin) and so was counted.
    pub fn record(&mut self, gap: Duration, settings: &Settings) -> bool {
        let bin = bin_of(gap, self.bin);
        if bin == 0 {
            return false;
        }
        if self.samples() + 1 >= MAX_SAMPLES {
            self.halve();
        }
        if bin >= u64::from(settings.bins()) {
            self.out_of_range += 1;
        } else {
            *self.gaps.entry(bin as u32).or_default() += 1;
        }
        true
    }

    /// Adds every idle period of `other` (same bin width) to this history; the newer
    /// last activity and cold start win.
    pub fn merge(&mut self, other: &History) {
        if other.bin != self.bin {
            return;
        }
        for (bin, count) in &other.gaps {
            *self.gaps.entry(*bin).or_default() += count;
        }
        self.out_of_range += other.out_of_range;
        while self.samples() >= MAX_SAMPLES {
            self.halve();
        }
        if other.last_activity > self.last_activity {
            self.last_activity = other.last_activity;
            self.cold_start = other.cold_start.or(self.cold_start);
        }
    }

    fn halve(&mut self) {
        self.gaps.values_mut().for_each(|n| *n /= 2);
        self.gaps.retain(|_, n| *n > 0);
        self.out_of_range /= 2;
    }

    /// Counts per bin `0..bins` (bin 0 empty) and the idle periods beyond, for a plan.
    pub(super) fn dense(&self, bins: u32) -> (Vec<f64>, f64) {
        let mut dense = vec![0.0; bins as usize];
        let mut beyond = f64::from(self.out_of_range);
        for (bin, count) in &self.gaps {
            match dense.get_mut(*bin as usize) {
                Some(slot) => *slot += f64::from(*count),
                None => beyond += f64::from(*count),
            }
        }
        (dense, beyond)
    }

    /// Reads the text form (see the module header).
    pub fn parse(text: &str) -> Result<History, HistoryError> {
        let bad = |what: String| HistoryError(what);
        let mut words = text.split_whitespace();
        match words.next() {
            Some("v1") => {}
            other => return Err(bad(format!("must begin with v1, not {other:?}"))),
        }
        let mut history: Option<History> = None;
        let (mut at, mut cold, mut oob, mut gaps) = (None, None, 0, BTreeMap::new());
        for word in words {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| bad(format!("{word:?} is not key=value")))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{key}={v:?} is not a number")))
            };
            match key {
                "bin" => {
                    let bin = humantime::parse_duration(value)
                        .ok()
                        .filter(|b| !b.is_zero())
                        .ok_or_else(|| bad(format!("bin={value:?} is not a duration")))?;
                    history = Some(History::new(bin));
                }
                "at" => at = Some(UNIX_EPOCH + Duration::from_millis(number(value)?)),
                "cold" => {
                    let ms = value
                        .strip_suffix("ms")
                        .ok_or_else(|| bad(format!("cold={value:?} is not milliseconds (e.g. 4200ms)")))?;
                    cold = Some(Duration::from_millis(number(ms)?));
                }
                "oob" => oob = u32::try_from(number(value)?).map_err(|_| bad(format!("oob={value} is too large")))?,
                "gaps" => {
                    for pair in value.split(',').filter(|p| !p.is_empty()) {
                        let (bin, count) = pair
                            .split_once(':')
                            .ok_or_else(|| bad(format!("gap {pair:?} is not bin:count")))?;
                        let (bin, count) = (number(bin)?, number(count)?);
                        if bin == 0 || bin >= u64::from(MAX_BINS) || count == 0 || count > u64::from(MAX_SAMPLES) {
                            return Err(bad(format!("gap {pair:?} is out of bounds")));
                        }
                        if gaps.insert(bin as u32, count as u32).is_some() {
                            return Err(bad(format!("bin {bin} appears twice")));
                        }
                    }
                }
                _ => return Err(bad(format!("has an unknown key {key:?}"))),
            }
        }
        let mut history = history.ok_or_else(|| bad("has no bin=".to_string()))?;
        history.gaps = gaps;
        history.out_of_range = oob;
        history.last_activity = at;
        history.cold_start = cold;
        if history.samples() > 2 * MAX_SAMPLES {
            return Err(bad(format!("holds {} idle periods, more than kept", history.samples())));
        }
        Ok(history)
    }
}

impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v1 bin={}", humantime::format_duration(self.bin))?;
        if let Some(at) = self.last_activity {
            let ms = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
            write!(f, " at={ms}")?;
        }
        if let Some(cold) = self.cold_start {
            write!(f, " cold={}ms", cold.as_millis())?;
        }
        write!(f, " oob={} gaps=", self.out_of_range)?;
        for (i, (bin, count)) in self.gaps.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{bin}:{count}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_gap_of_one_bin_or_less_is_not_an_idle_period() {
        let settings = Settings::default();
        let mut h = History::new(MIN);
        assert!(!h.record(Duration::from_secs(1), &settings));
        assert!(!h.record(MIN, &settings));
        assert!(h.record(MIN + Duration::from_millis(1), &settings));
        assert!(h.record(MIN * 15, &settings));
        assert!(h.record(MIN * 15 + Duration::from_secs(30), &settings));
        assert!(h.record(MIN * 4 * 60 + MIN, &settings));
        assert_eq!(h.gaps().collect::<Vec<_>>(), vec![(1, 1), (14, 1), (15, 1)]);
        assert_eq!(h.out_of_range(), 1);
        assert_eq!(h.samples(), 4);
    }

    #[test]
    fn the_text_form_round_trips() {
        let mut h = History::new(MIN);
        for minutes in [2, 15, 15, 60, 300] {
            h.record(MIN * minutes, &Settings::default());
        }
        h.set_last_activity(UNIX_EPOCH + Duration::from_millis(1_764_905_359_123));
        h.set_cold_start(Duration::from_millis(4200));
        let text = h.to_string();
        assert_eq!(text, "v1 bin=1m at=1764905359123 cold=4200ms oob=1 gaps=1:1,14:2,59:1");
        assert_eq!(History::parse(&text).unwrap(), h);
        let empty = History::new(Duration::from_secs(2));
        assert_eq!(History::parse(&empty.to_string()).unwrap(), empty);
    }

    #[test]
    fn malformed_texts_name_what_is_wrong() {
        let cases = [
            ("", "v1"),
            ("v2 bin=1m", "v1"),
            ("v1 gaps=1:2", "no bin"),
            ("v1 bin=soon", "bin="),
            ("v1 bin=1m gaps=1-2", "bin:count"),
            ("v1 bin=1m gaps=0:2", "out of bounds"),
            ("v1 bin=1m gaps=3:0", "out of bounds"),
            ("v1 bin=1m gaps=3:1,3:1", "twice"),
            ("v1 bin=1m at=yesterday", "at="),
            ("v1 bin=1m cold=4s", "milliseconds"),
            ("v1 bin=1m colour=red", "unknown key"),
            ("v1 bin=1m gaps=1:512,2:512,3:512", "more than kept"),
            ("v1 bin=1m oob", "key=value"),
        ];
        for (text, expected) in cases {
            let error = History::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn counts_are_halved_at_the_bound_so_newer_idle_times_weigh_more() {
        let settings = Settings::default();
        let mut h = History::new(MIN);
        for _ in 0..MAX_SAMPLES - 1 {
            h.record(MIN * 5, &settings);
        }
        assert_eq!(h.samples(), MAX_SAMPLES - 1);
        h.record(MIN * 30, &settings);
        assert_eq!(h.gaps().collect::<Vec<_>>(), vec![(4, 255), (29, 1)]);
    }

    #[test]
    fn merging_adds_idle_periods_and_keeps_the_newest_activity() {
        let settings = Settings::default();
        let (mut a, mut b) = (History::new(MIN), History::new(MIN));
        a.record(MIN * 5, &settings);
        b.record(MIN * 5, &settings);
        b.record(MIN * 9, &settings);
        b.set_last_activity(UNIX_EPOCH + Duration::from_secs(10));
        a.merge(&b);
        assert_eq!(a.gaps().collect::<Vec<_>>(), vec![(4, 2), (8, 1)]);
        assert_eq!(a.last_activity(), b.last_activity());
        let other_bin = History::new(Duration::from_secs(1));
        a.merge(&other_bin);
        assert_eq!(a.samples(), 3);
    }
}
