//! `vm_state` and `target_info`: computed from the VMs' gates when scraped, one series
//! each per VM (or workload).

use std::sync::{Arc, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::PREFIX;
use crate::vm::{VmKey, VmPhase};

/// Lists every VM with its current phase and kind (called at scrape time).
pub type PhaseSource = Box<dyn Fn() -> Vec<(VmKey, VmPhase, String)> + Send + Sync>;

/// `vm_state{namespace,vm,state}`: one series per VM, its current state, value 1 —
/// computed when scraped, so it never disagrees with the gates and costs no memory per
/// VM between scrapes.
///
/// `target_info{namespace,vm,kind}`: value 1, the kind of each target
/// (`VirtualMachine`, `Deployment`, ...). The kind is not a label of the other series,
/// so none of the existing series changes identity; join it where wanted:
/// `vm_activator_cold_start_seconds_count * on(namespace, vm) group_left(kind) vm_activator_target_info`.
pub(super) struct VmStateCollector {
    desc: Desc,
    info: Desc,
    source: RwLock<Option<PhaseSource>>,
}

impl VmStateCollector {
    pub(super) fn new() -> Self {
        let desc = Desc::new(
            format!("{PREFIX}_vm_state"),
            "1 for the VM's current state (one series per VM).".into(),
            vec!["namespace".into(), "state".into(), "vm".into()],
            Default::default(),
        )
        .expect("valid metric");
        let info = Desc::new(
            format!("{PREFIX}_target_info"),
            "1 for each target, labelled with its kind (VirtualMachine, Deployment, StatefulSet, ...).".into(),
            vec!["kind".into(), "namespace".into(), "vm".into()],
            Default::default(),
        )
        .expect("valid metric");
        Self {
            desc,
            info,
            source: RwLock::new(None),
        }
    }
}

impl VmStateCollector {
    /// Where VMs' phases are read at scrape time.
    pub(super) fn set_source(&self, source: PhaseSource) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The collector to register (the registry takes it by value; it shares this one).
    pub(super) fn collector(self: &Arc<Self>) -> Box<dyn Collector> {
        Box::new(VmStates(self.clone()))
    }
}

/// The registry takes collectors by value; this shares one with `Metrics`.
struct VmStates(Arc<VmStateCollector>);

impl Collector for VmStates {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc, &self.0.info]
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
        let family = |desc: &Desc| {
            let mut family = MetricFamily::default();
            family.set_name(desc.fq_name.clone());
            family.set_help(desc.help.clone());
            family.set_field_type(MetricType::GAUGE);
            family
        };
        let one = |labels: Vec<LabelPair>| {
            let mut gauge = Gauge::default();
            gauge.set_value(1.0);
            let mut metric = Metric::from_gauge(gauge);
            metric.set_label(labels);
            metric
        };
        let (mut states, mut infos) = (family(&self.0.desc), family(&self.0.info));
        for (key, phase, kind) in source() {
            states.mut_metric().push(one(vec![
                label("namespace", &key.namespace),
                label("state", phase.as_str()),
                label("vm", &key.name),
            ]));
            infos.mut_metric().push(one(vec![
                label("kind", &kind),
                label("namespace", &key.namespace),
                label("vm", &key.name),
            ]));
        }
        vec![states, infos]
    }
}
