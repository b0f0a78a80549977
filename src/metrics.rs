//! Prometheus metrics: one registry, typed handles created once, per-VM label values
//! resolved once per VM (not per request). Names and labels are the contract of
//! DESIGN §2; tests scrape them.
//!
//! Owns: metric names, labels, buckets, the text exposition.
//! Must not import any other module but `vm`.

use std::sync::{Arc, OnceLock, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::vm::{VmKey, VmPhase};

const PREFIX: &str = "vm_activator";

/// Why a request was refused without reaching the guest (`rejected_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The VM's held-request bound was reached.
    BufferFull,
    /// The backend failed to start the VM (or it stopped while requests waited).
    StartFailed,
    /// The VM did not become ready in time.
    StartTimeout,
    /// The activator is draining (SIGTERM).
    Draining,
    /// The body was larger than the limit.
    BodyTooLarge,
    /// The request was not a valid CloudEvent.
    InvalidEvent,
    /// Authentication or authorization failed.
    Unauthorized,
}

impl RejectReason {
    /// Every reason.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::BufferFull,
        RejectReason::StartFailed,
        RejectReason::StartTimeout,
        RejectReason::Draining,
        RejectReason::BodyTooLarge,
        RejectReason::InvalidEvent,
        RejectReason::Unauthorized,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BufferFull => "buffer_full",
            RejectReason::StartFailed => "start_failed",
            RejectReason::StartTimeout => "start_timeout",
            RejectReason::Draining => "draining",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::InvalidEvent => "invalid_event",
            RejectReason::Unauthorized => "unauthorized",
        }
    }
}

/// Phases of a cold start (`cold_start_phase_seconds{phase}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdStartPhase {
    /// The backend's start (or resume) call.
    StartCall,
    /// From the start call returning until the backend reports the VM running.
    Boot,
    /// From running until the guest application answered its probe.
    Probe,
}

struct Families {
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    cold_start: HistogramVec,
    cold_start_phase: HistogramVec,
    buffered: IntGaugeVec,
    in_flight: IntGaugeVec,
    rejected: IntCounterVec,
    scale_ups: IntCounterVec,
    scale_downs: IntCounterVec,
}

/// The process's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    families: Arc<Families>,
    phases: Arc<VmStateCollector>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Cold starts on TCG take seconds, on KVM well under one; the warm path takes
/// microseconds to milliseconds.
const COLD_START_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let vm = &["namespace", "vm"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help).namespace(PREFIX), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help).namespace(PREFIX), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help)
                    .namespace(PREFIX)
                    .buckets(buckets.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let families = Families {
            requests_total: counter(
                "requests_total",
                "Requests answered, by HTTP status code.",
                &["namespace", "vm", "code"],
            ),
            request_duration: histogram(
                "request_duration_seconds",
                "Time from request arrival to response headers, including any cold start.",
                vm,
                REQUEST_BUCKETS,
            ),
            cold_start: histogram(
                "cold_start_seconds",
                "First held request's arrival until the guest answered its readiness probe.",
                vm,
                COLD_START_BUCKETS,
            ),
            cold_start_phase: histogram(
                "cold_start_phase_seconds",
                "Cold start by phase: start_call, boot (backend reports running), probe (guest answered).",
                &["namespace", "vm", "phase"],
                COLD_START_BUCKETS,
            ),
            buffered: gauge("buffered_requests", "Requests held while the VM is not ready.", vm),
            in_flight: gauge(
                "in_flight_requests",
                "Requests forwarded to the guest and not yet answered.",
                vm,
            ),
            rejected: counter(
                "rejected_total",
                "Requests refused without reaching the guest, by reason.",
                &["namespace", "vm", "reason"],
            ),
            scale_ups: counter("scale_ups_total", "Starts or resumes issued.", vm),
            scale_downs: counter(
                "scale_downs_total",
                "Idle VMs stopped or paused, by action.",
                &["namespace", "vm", "action"],
            ),
        };
        let phases = Arc::new(VmStateCollector::new());
        registry
            .register(Box::new(VmStates(phases.clone())))
            .expect("unique metric");
        Metrics {
            registry,
            families: Arc::new(families),
            phases,
        }
    }

    /// Where `vm_state` reads every VM's phase at scrape time (the activator's gates).
    pub fn set_phase_source(&self, source: PhaseSource) {
        *self.phases.source.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// This VM's handles. Creates no series: they appear on the VM's first request (see
    /// `VmMetrics`), so thousands of idle VMs cost nothing here.
    pub fn vm(&self, key: &VmKey) -> VmMetrics {
        VmMetrics {
            inner: Arc::new(VmMetricsInner {
                labels: [key.namespace.clone(), key.name.clone()],
                families: self.families.clone(),
                series: OnceLock::new(),
            }),
        }
    }

    /// Counts a request answered for a path that names no known VM. Recorded with empty
    /// `namespace` and `vm` labels so that unknown names cannot grow the series count.
    pub fn unknown_vm_request(&self, code: u16) {
        self.families
            .requests_total
            .with_label_values(&["", "", status_label(code)])
            .inc();
    }

    /// Drops every series of a VM that left the catalog.
    pub fn remove_vm(&self, key: &VmKey) {
        let f = &self.families;
        let (ns, name) = (key.namespace.as_str(), key.name.as_str());
        for family in [&f.buffered, &f.in_flight] {
            let _ = family.remove_label_values(&[ns, name]);
        }
        for family in [&f.request_duration, &f.cold_start] {
            let _ = family.remove_label_values(&[ns, name]);
        }
        let _ = f.scale_ups.remove_label_values(&[ns, name]);
        for p in ["start_call", "boot", "probe"] {
            let _ = f.cold_start_phase.remove_label_values(&[ns, name, p]);
        }
        // Counters by code, reason and action: every label value is from a finite set.
        for code in STATUS_LABELS {
            let _ = f.requests_total.remove_label_values(&[ns, name, code]);
        }
        for reason in RejectReason::ALL {
            let _ = f.rejected.remove_label_values(&[ns, name, reason.as_str()]);
        }
        for action in ["stop", "pause"] {
            let _ = f.scale_downs.remove_label_values(&[ns, name, action]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = encoder.encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Every value `status_label` can return.
const STATUS_LABELS: [&str; 21] = [
    "200", "201", "202", "204", "400", "401", "403", "404", "405", "408", "413", "429", "500", "502", "503", "504",
    "1xx", "2xx", "3xx", "4xx", "5xx",
];

/// Status codes as label values without allocating for the common ones.
fn status_label(code: u16) -> &'static str {
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
    phases: [Histogram; 3],
    rejected: [IntCounter; RejectReason::ALL.len()],
    scale_downs: [IntCounter; SCALE_DOWN_ACTIONS.len()],
    /// `requests_total` by code, resolved on first use of each code: no label hashing
    /// per request.
    requests: [OnceLock<IntCounter>; STATUS_LABELS.len()],
}

const SCALE_DOWN_ACTIONS: [&str; 2] = ["stop", "pause"];

impl VmMetrics {
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
                phases: ["start_call", "boot", "probe"].map(|p| f.cold_start_phase.with_label_values(&[ns, name, p])),
                rejected: RejectReason::ALL.map(|r| f.rejected.with_label_values(&[ns, name, r.as_str()])),
                scale_downs: SCALE_DOWN_ACTIONS.map(|a| f.scale_downs.with_label_values(&[ns, name, a])),
                requests: std::array::from_fn(|_| OnceLock::new()),
            })
        })
    }

    /// Observes one cold-start phase.
    pub fn cold_start_phase(&self, phase: ColdStartPhase, seconds: f64) {
        let index = match phase {
            ColdStartPhase::StartCall => 0,
            ColdStartPhase::Boot => 1,
            ColdStartPhase::Probe => 2,
        };
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

/// Lists every VM with its current phase (called at scrape time).
pub type PhaseSource = Box<dyn Fn() -> Vec<(VmKey, VmPhase)> + Send + Sync>;

/// `vm_state{namespace,vm,state}`: one series per VM, its current state, value 1 —
/// computed when scraped, so it never disagrees with the gates and costs no memory per
/// VM between scrapes.
struct VmStateCollector {
    desc: Desc,
    source: RwLock<Option<PhaseSource>>,
}

impl VmStateCollector {
    fn new() -> Self {
        let desc = Desc::new(
            format!("{PREFIX}_vm_state"),
            "1 for the VM's current state (one series per VM).".into(),
            vec!["namespace".into(), "state".into(), "vm".into()],
            Default::default(),
        )
        .expect("valid metric");
        Self {
            desc,
            source: RwLock::new(None),
        }
    }
}

/// The registry takes collectors by value; this shares one with `Metrics`.
struct VmStates(Arc<VmStateCollector>);

impl Collector for VmStates {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let source = self.0.source.read().unwrap_or_else(|e| e.into_inner());
        let Some(source) = source.as_ref() else {
            return Vec::new();
        };
        let label = |name: &str, value: &str| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        };
        let mut family = MetricFamily::default();
        family.set_name(self.0.desc.fq_name.clone());
        family.set_help(self.0.desc.help.clone());
        family.set_field_type(MetricType::GAUGE);
        for (key, phase) in source() {
            let mut gauge = Gauge::default();
            gauge.set_value(1.0);
            let mut metric = Metric::from_gauge(gauge);
            metric.set_label(vec![
                label("namespace", &key.namespace),
                label("state", phase.as_str()),
                label("vm", &key.name),
            ]);
            family.mut_metric().push(metric);
        }
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_every_contract_name() {
        let metrics = Metrics::new();
        metrics.set_phase_source(Box::new(|| vec![(VmKey::new("default", "demo"), VmPhase::Ready)]));
        let vm = metrics.vm(&VmKey::new("default", "demo"));
        vm.request(202);
        vm.rejected(RejectReason::BufferFull);
        vm.scaled_down("stop");
        vm.series().cold_start.observe(1.0);
        vm.cold_start_phase(ColdStartPhase::Boot, 0.5);
        let text = metrics.render();
        for name in [
            "vm_activator_requests_total{code=\"202\",namespace=\"default\",vm=\"demo\"} 1",
            "vm_activator_request_duration_seconds_bucket",
            "vm_activator_cold_start_seconds_count{namespace=\"default\",vm=\"demo\"} 1",
            "vm_activator_cold_start_phase_seconds_count{namespace=\"default\",phase=\"boot\",vm=\"demo\"} 1",
            "vm_activator_buffered_requests{namespace=\"default\",vm=\"demo\"} 0",
            "vm_activator_in_flight_requests",
            "vm_activator_rejected_total{namespace=\"default\",reason=\"buffer_full\",vm=\"demo\"} 1",
            "vm_activator_scale_ups_total",
            "vm_activator_scale_downs_total{action=\"stop\",namespace=\"default\",vm=\"demo\"} 1",
            "vm_activator_vm_state{namespace=\"default\",state=\"ready\",vm=\"demo\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(
            !text.contains("state=\"stopped\""),
            "only the current state is exported"
        );
    }

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

    #[test]
    fn an_unused_vm_has_only_its_state_series() {
        let metrics = Metrics::new();
        metrics.set_phase_source(Box::new(|| vec![(VmKey::new("default", "idle"), VmPhase::Stopped)]));
        let vm = metrics.vm(&VmKey::new("default", "idle"));
        let text = metrics.render();
        let series: Vec<&str> = text.lines().filter(|l| l.contains("vm=\"idle\"")).collect();
        assert_eq!(
            series,
            ["vm_activator_vm_state{namespace=\"default\",state=\"stopped\",vm=\"idle\"} 1"]
        );
        vm.request(202);
        let text = metrics.render();
        assert!(
            text.contains("vm_activator_rejected_total{namespace=\"default\",reason=\"buffer_full\",vm=\"idle\"} 0")
        );
        assert!(text.contains("vm_activator_scale_downs_total{action=\"pause\",namespace=\"default\",vm=\"idle\"} 0"));
    }
}
