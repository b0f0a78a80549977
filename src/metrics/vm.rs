//! One VM's series: created together on the VM's first start or request, then
//! reached without hashing a label per request.

use std::sync::{Arc, OnceLock};

use prometheus::{Histogram, IntCounter, IntGauge};

use super::{ColdStartPhase, Families, RejectReason};
use crate::vm::VmKey;

/// Every value `status_label` can return.
pub(super) const STATUS_LABELS: [&str; 21] = [
    "200", "201", "202", "204", "400", "401", "403", "404", "405", "408", "413", "429", "500", "502", "503", "504",
    "1xx", "2xx", "3xx", "4xx", "5xx",
];

/// Status codes as label values without allocating for the common ones.
pub(super) fn status_label(code: u16) -> &'static str {
    STATUS_LABELS[status_index(code)]
}

/// The position of `code`'s label in `STATUS_LABELS` (a match, not a search: per request).
fn status_index(code: u16) -> usize {
    match code {
        200 => 0,
        201 => 1,
        202 => 2,
        204 => 3,
        400 => 4,
        401 => 5,
        403 => 6,
        404 => 7,
        405 => 8,
        408 => 9,
        413 => 10,
        429 => 11,
        500 => 12,
        502 => 13,
        503 => 14,
        504 => 15,
        _ => match code {
            100..=199 => 16,
            200..=299 => 17,
            300..=399 => 18,
            400..=499 => 19,
            _ => 20,
        },
    }
}

/// One VM's metric handles. Cheap to clone.
///
/// `vm_state` is read from the gates at scrape time (see `set_phase_source`). The VM's
/// other series — including zero-valued `rejected_total` and `scale_downs_total` for each
/// reason and action, so `rate()` and alerts see them before the first event — are
/// created together on first use: the VM's first start or request.
#[derive(Clone)]
pub struct VmMetrics {
    inner: Arc<VmMetricsInner>,
}

struct VmMetricsInner {
    labels: [String; 2],
    families: Arc<Families>,
    /// Boxed: an unused VM pays one pointer, not the handles.
    series: OnceLock<Box<VmSeries>>,
}

/// The series of a VM in use.
pub struct VmSeries {
    /// `buffered_requests`.
    pub buffered: IntGauge,
    /// `in_flight_requests`.
    pub in_flight: IntGauge,
    /// `request_duration_seconds`.
    pub request_duration: Histogram,
    /// `cold_start_seconds`.
    pub cold_start: Histogram,
    /// `scale_ups_total`.
    pub scale_ups: IntCounter,
    /// `guest_connect_retries_total`.
    pub connect_retries: IntCounter,
    phases: [Histogram; ColdStartPhase::ALL.len()],
    /// `start_timeout_seconds`: the VM's budget, set at each start.
    pub start_timeout: prometheus::Gauge,
    rejected: [IntCounter; RejectReason::ALL.len()],
    scale_downs: [IntCounter; SCALE_DOWN_ACTIONS.len()],
    prewarms: [IntCounter; PREWARM_OUTCOMES.len()],
    /// `requests_total` by code, resolved on first use of each code: no label hashing
    /// per request.
    requests: [OnceLock<IntCounter>; STATUS_LABELS.len()],
}

pub(super) const SCALE_DOWN_ACTIONS: [&str; 3] = ["stop", "pause", "hibernate"];
/// The `outcome` label values of `prewarm_total`.
pub(super) const PREWARM_OUTCOMES: [&str; 2] = ["used", "unused"];

impl VmMetrics {
    /// Handles for `key`'s series in `families`; no series is created yet.
    pub(super) fn new(key: &VmKey, families: Arc<Families>) -> VmMetrics {
        VmMetrics {
            inner: Arc::new(VmMetricsInner {
                labels: [key.namespace.clone(), key.name.clone()],
                families,
                series: OnceLock::new(),
            }),
        }
    }

    /// The VM's series if something created them already.
    pub fn series_if_created(&self) -> Option<&VmSeries> {
        self.inner.series.get().map(|series| &**series)
    }

    /// The VM's series, created on first use.
    pub fn series(&self) -> &VmSeries {
        let inner = &*self.inner;
        inner.series.get_or_init(|| {
            let f = &inner.families;
            let [ns, name] = &inner.labels;
            let vm = [ns.as_str(), name.as_str()];
            Box::new(VmSeries {
                buffered: f.buffered.with_label_values(&vm),
                in_flight: f.in_flight.with_label_values(&vm),
                request_duration: f.request_duration.with_label_values(&vm),
                cold_start: f.cold_start.with_label_values(&vm),
                scale_ups: f.scale_ups.with_label_values(&vm),
                connect_retries: f.connect_retries.with_label_values(&vm),
                phases: ColdStartPhase::ALL.map(|p| f.cold_start_phase.with_label_values(&[ns, name, p.as_str()])),
                rejected: RejectReason::ALL.map(|r| f.rejected.with_label_values(&[ns, name, r.as_str()])),
                start_timeout: f.start_timeout.with_label_values(&vm),
                scale_downs: SCALE_DOWN_ACTIONS.map(|a| f.scale_downs.with_label_values(&[ns, name, a])),
                prewarms: PREWARM_OUTCOMES.map(|o| f.prewarms.with_label_values(&[ns, name, o])),
                requests: std::array::from_fn(|_| OnceLock::new()),
            })
        })
    }

    /// Observes one cold-start phase.
    pub fn cold_start_phase(&self, phase: ColdStartPhase, seconds: f64) {
        let index = ColdStartPhase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.series().phases[index].observe(seconds);
    }

    /// Counts an answered request by status code.
    pub fn request(&self, code: u16) {
        let index = status_index(code);
        let label = STATUS_LABELS[index];
        self.series().requests[index]
            .get_or_init(|| {
                let [ns, name] = &self.inner.labels;
                self.inner.families.requests_total.with_label_values(&[ns, name, label])
            })
            .inc();
    }

    /// Counts a request sent again after a connection to the guest failed.
    pub fn connect_retry(&self) {
        self.series().connect_retries.inc();
    }

    /// Counts a rejection.
    pub fn rejected(&self, reason: RejectReason) {
        let index = RejectReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.series().rejected[index].inc();
    }

    /// Counts a scale-down (`stop` or `pause`).
    pub fn scaled_down(&self, action: &str) {
        match SCALE_DOWN_ACTIONS.iter().position(|a| *a == action) {
            Some(index) => self.series().scale_downs[index].inc(),
            None => tracing::warn!(action, "unknown scale-down action"),
        }
    }
}

impl VmMetrics {
    /// Counts how a pre-warm ended: an event came while it was up (`used`), or not.
    pub fn prewarm(&self, used: bool) {
        self.series().prewarms[usize::from(!used)].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_their_labels() {
        for (code, label) in [
            (200, "200"),
            (202, "202"),
            (504, "504"),
            (101, "1xx"),
            (299, "2xx"),
            (302, "3xx"),
            (418, "4xx"),
            (599, "5xx"),
        ] {
            assert_eq!(status_label(code), label, "{code}");
        }
        for label in STATUS_LABELS.iter().filter(|l| !l.ends_with("xx")) {
            let code: u16 = label.parse().unwrap();
            assert_eq!(status_label(code), *label);
        }
    }
}
