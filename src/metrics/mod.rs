//! Prometheus metrics: one registry, typed handles created once, per-VM label values
//! resolved once per VM (not per request). Names and labels are the contract in the
//! handbook (docs/operations.md, checked by tests/docs.rs); tests scrape them.
//!
//! Long because: a third of it is the exposition's tests (names and labels are a
//! contract).
//!
//! This file has the registry and the families; `vm.rs` one VM's series, `state.rs` the
//! `vm_state` gauge computed at scrape time.
//!
//! Owns: metric names, labels, buckets, the text exposition.
//! Must not import any other module but `vm`.

mod state;
mod vm;

use std::sync::Arc;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use state::PhaseSource;
pub use vm::{VmMetrics, VmSeries};

use crate::vm::VmKey;
use state::VmStateCollector;
use vm::{status_label, PREWARM_OUTCOMES, SCALE_DOWN_ACTIONS, STATUS_LABELS};

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
    /// The body did not come within `ingress.body_read_timeout`.
    BodyTimeout,
    /// The request was not a valid CloudEvent.
    InvalidEvent,
    /// Authentication or authorization failed.
    Unauthorized,
    /// The name is refused (several opted-in workloads share it).
    Conflict,
    /// The VM was not ready and the backend's API was unreachable.
    BackendUnavailable,
}

impl RejectReason {
    /// Every reason.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::BufferFull,
        RejectReason::StartFailed,
        RejectReason::StartTimeout,
        RejectReason::Draining,
        RejectReason::BodyTooLarge,
        RejectReason::BodyTimeout,
        RejectReason::InvalidEvent,
        RejectReason::Unauthorized,
        RejectReason::Conflict,
        RejectReason::BackendUnavailable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BufferFull => "buffer_full",
            RejectReason::StartFailed => "start_failed",
            RejectReason::StartTimeout => "start_timeout",
            RejectReason::Draining => "draining",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::BodyTimeout => "body_timeout",
            RejectReason::InvalidEvent => "invalid_event",
            RejectReason::BackendUnavailable => "backend_unavailable",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Conflict => "conflict",
        }
    }
}

/// Phases of a cold start (`cold_start_phase_seconds{phase}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdStartPhase {
    /// The backend's start (or resume) call.
    StartCall,
    /// From the start call returning until the backend reports the VM running (a boot).
    Boot,
    /// As `Boot`, for a resume from pause.
    Resume,
    /// As `Boot`, for a restore from a hibernated state.
    Restore,
    /// From running until the guest application answered its probe.
    Probe,
}

impl ColdStartPhase {
    /// Every phase, in the order of its series.
    pub const ALL: [ColdStartPhase; 5] = [
        ColdStartPhase::StartCall,
        ColdStartPhase::Boot,
        ColdStartPhase::Resume,
        ColdStartPhase::Restore,
        ColdStartPhase::Probe,
    ];

    /// The `phase` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ColdStartPhase::StartCall => "start_call",
            ColdStartPhase::Boot => "boot",
            ColdStartPhase::Resume => "resume",
            ColdStartPhase::Restore => "restore",
            ColdStartPhase::Probe => "probe",
        }
    }
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
    prewarms: IntCounterVec,
    connect_retries: IntCounterVec,
    start_timeout: GaugeVec,
    ready: IntGauge,
}

/// The process's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The name of every family registered, in order (for the handbook's check).
    names: Arc<[String]>,
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
        let names = std::cell::RefCell::new(Vec::new());
        let register = |collector: Box<dyn prometheus::core::Collector>| {
            names
                .borrow_mut()
                .extend(collector.desc().iter().map(|desc| desc.fq_name.clone()));
            registry.register(collector).expect("unique metric");
        };
        let vm = &["namespace", "vm"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help).namespace(PREFIX), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help).namespace(PREFIX), labels).expect("valid metric");
            register(Box::new(g.clone()));
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
            register(Box::new(h.clone()));
            h
        };
        let start_timeout = GaugeVec::new(
            Opts::new(
                "start_timeout_seconds",
                "The VM's start timeout: the budget a cold start (and a held event) has. Set from its first start on.",
            )
            .namespace(PREFIX),
            vm,
        )
        .expect("valid metric");
        register(Box::new(start_timeout.clone()));
        let ready = IntGauge::with_opts(
            Opts::new(
                "ready",
                "1 while this replica takes events (its /readyz): not draining, backend reachable.",
            )
            .namespace(PREFIX),
        )
        .expect("valid metric");
        register(Box::new(ready.clone()));
        let families = Families {
            start_timeout,
            ready,
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
            connect_retries: counter(
                "guest_connect_retries_total",
                "Requests sent again because no connection to the guest could be made (nothing had reached it).",
                vm,
            ),
            scale_downs: counter(
                "scale_downs_total",
                "Idle VMs stopped or paused, by action.",
                &["namespace", "vm", "action"],
            ),
            prewarms: counter(
                "prewarm_total",
                "Starts ahead of the event the adaptive idle policy expected, by outcome: used (an event came while it was up) or unused (scaled down again without one).",
                &["namespace", "vm", "outcome"],
            ),
        };
        let phases = Arc::new(VmStateCollector::new());
        register(phases.collector());
        let names = names.into_inner().into();
        Metrics {
            registry,
            names,
            families: Arc::new(families),
            phases,
        }
    }

    /// Sets `ready` (the replica's `/readyz`, read when scraped).
    pub fn set_ready(&self, ready: bool) {
        self.families.ready.set(i64::from(ready));
    }

    /// Where `vm_state` reads every VM's phase at scrape time (the activator's gates).
    pub fn set_phase_source(&self, source: PhaseSource) {
        self.phases.set_source(source);
    }

    /// This VM's handles. Creates no series: they appear on the VM's first request (see
    /// `VmMetrics`), so thousands of idle VMs cost nothing here.
    pub fn vm(&self, key: &VmKey) -> VmMetrics {
        VmMetrics::new(key, self.families.clone())
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
        let _ = f.connect_retries.remove_label_values(&[ns, name]);
        let _ = f.start_timeout.remove_label_values(&[ns, name]);
        for phase in ColdStartPhase::ALL {
            let _ = f.cold_start_phase.remove_label_values(&[ns, name, phase.as_str()]);
        }
        // Counters by code, reason and action: every label value is from a finite set.
        for code in STATUS_LABELS {
            let _ = f.requests_total.remove_label_values(&[ns, name, code]);
        }
        for reason in RejectReason::ALL {
            let _ = f.rejected.remove_label_values(&[ns, name, reason.as_str()]);
        }
        for action in SCALE_DOWN_ACTIONS {
            let _ = f.scale_downs.remove_label_values(&[ns, name, action]);
        }
        for outcome in PREWARM_OUTCOMES {
            let _ = f.prewarms.remove_label_values(&[ns, name, outcome]);
        }
    }

    /// The name of every metric family this process can export (`vm_activator_…`),
    /// whether or not it has a series yet.
    pub fn family_names(&self) -> &[String] {
        &self.names
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmPhase;

    #[test]
    fn exposes_every_contract_name() {
        let metrics = Metrics::new();
        metrics.set_phase_source(Box::new(|| {
            vec![(VmKey::new("default", "demo"), VmPhase::Ready, "Deployment".into())]
        }));
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
            "vm_activator_guest_connect_retries_total{namespace=\"default\",vm=\"demo\"} 0",
            "vm_activator_scale_downs_total{action=\"stop\",namespace=\"default\",vm=\"demo\"} 1",
            "vm_activator_vm_state{namespace=\"default\",state=\"ready\",vm=\"demo\"} 1",
            "vm_activator_target_info{kind=\"Deployment\",namespace=\"default\",vm=\"demo\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert!(
            !text.contains("state=\"stopped\""),
            "only the current state is exported"
        );
    }

    #[test]
    fn an_unused_vm_has_only_its_state_and_info_series() {
        let metrics = Metrics::new();
        metrics.set_phase_source(Box::new(|| {
            vec![(VmKey::new("default", "idle"), VmPhase::Stopped, "VirtualMachine".into())]
        }));
        let vm = metrics.vm(&VmKey::new("default", "idle"));
        let text = metrics.render();
        let series: Vec<&str> = text.lines().filter(|l| l.contains("vm=\"idle\"")).collect();
        assert_eq!(
            series,
            [
                "vm_activator_target_info{kind=\"VirtualMachine\",namespace=\"default\",vm=\"idle\"} 1",
                "vm_activator_vm_state{namespace=\"default\",state=\"stopped\",vm=\"idle\"} 1"
            ]
        );
        vm.request(202);
        let text = metrics.render();
        assert!(
            text.contains("vm_activator_rejected_total{namespace=\"default\",reason=\"buffer_full\",vm=\"idle\"} 0")
        );
        assert!(text.contains("vm_activator_scale_downs_total{action=\"pause\",namespace=\"default\",vm=\"idle\"} 0"));
    }
}
