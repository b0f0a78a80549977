//! The VM writes — the run strategy (start, stop), the pause and unpause subresources,
//! the compare-and-stop that lets replicas agree without a leader — this replica's
//! activity record on any target, and the idle history kept for the next scale-down's
//! patch. (Workload scaling is in `scale.rs`.)

use std::collections::BTreeMap;
use std::time::SystemTime;

use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::targets::Target;
use super::{KubevirtBackend, VirtualMachine};
use crate::backend::{BackendError, BackendPhase, StopOutcome};
use crate::vm::{VmKey, LAST_ACTIVITY_ANNOTATION};

/// JSON pointer to the activity annotation (`/` in the key escaped as `~1`).
pub(super) const LAST_ACTIVITY_POINTER: &str = "/metadata/annotations/vm-activator.io~1last-activity";
/// JSON pointer to the idle history annotation.
pub(super) const IDLE_HISTORY_POINTER: &str = "/metadata/annotations/vm-activator.io~1idle-history";

/// The patch operation that stores `history` (an `add` replaces an existing value).
pub(super) fn idle_history_op(history: &str) -> serde_json::Value {
    json!({ "op": "add", "path": IDLE_HISTORY_POINTER, "value": history })
}

/// The recorded activity in a target's annotations: the annotation's exact text (for a
/// JSON patch `test`) and time.
pub(super) fn recorded_activity(annotations: &BTreeMap<String, String>) -> Option<(String, SystemTime)> {
    let text = annotations.get(LAST_ACTIVITY_ANNOTATION)?;
    let at = humantime::parse_rfc3339_weak(text).ok()?;
    Some((text.clone(), at))
}

impl KubevirtBackend {
    /// Keeps an idle history handed over until the target's next idle scale-down, which
    /// writes it in its own patch (one per target: a newer one replaces it).
    pub(super) fn keep_history_for_next_stop(&self, key: &VmKey, history: &str) {
        let mut histories = self.idle_histories.lock().expect("histories lock");
        histories.insert(key.clone(), history.to_string());
    }

    /// The idle history the next scale-down of `key` is to write, if one was handed over.
    pub(super) fn history_to_write(&self, key: &VmKey) -> Option<String> {
        self.idle_histories.lock().expect("histories lock").get(key).cloned()
    }

    /// Drops the handed-over idle history `written` once a scale-down wrote it, unless a
    /// newer one was handed over meanwhile.
    pub(super) fn forget_written_history(&self, key: &VmKey, written: Option<&str>) {
        let mut histories = self.idle_histories.lock().expect("histories lock");
        if histories.get(key).map(String::as_str) == written {
            histories.remove(key);
        }
    }

    /// The idle stop (`Backend::stop_if_idle`): nothing if a peer's or an operator's stop
    /// already took effect; otherwise the compare-and-stop (a VM) or the compare-and-
    /// scale-down (a workload) against the activity record, carrying the idle history
    /// handed over since the last one. Returns once the target is stopped.
    pub(super) async fn idle_stop(&self, key: &VmKey, local_activity: SystemTime) -> Result<StopOutcome, BackendError> {
        let target = self.target(key)?;
        let stopped = match &target {
            Target::Vm(vm) => vm.spec.run_strategy.as_deref() == Some("Halted"),
            Target::Workload { object, .. } => super::workloads::replicas(object) == 0,
        };
        if stopped {
            // A peer's stop (or an operator's) won: just wait for it.
            self.wait_for(key, "stop", BackendPhase::Stopped).await?;
            return Ok(StopOutcome::Stopped);
        }
        let Some((recorded, _)) = self.latest_activity(key, target.annotations()) else {
            // Nothing to compare against yet: record ours; the next idle check compares.
            self.write_activity(key, local_activity).await?;
            return Ok(StopOutcome::PeerActive);
        };
        // The idle history handed over since the last scale-down rides on this write.
        let history = self.history_to_write(key);
        let history = history.as_deref();
        let outcome = match &target {
            Target::Vm(vm) => self.compare_and_stop(key, vm, &recorded, history).await?,
            Target::Workload { kind, object } => self.scale_down(key, *kind, object, Some(&recorded), history).await?,
        };
        if outcome == StopOutcome::PeerActive {
            // Whoever wrote since, the store is the one to go by next time (also if ours
            // was of an object since replaced under the same name).
            self.own_activity.lock().expect("own activity lock").remove(key);
        }
        if outcome == StopOutcome::Stopped {
            self.forget_written_history(key, history);
            self.wait_for(key, "stop", BackendPhase::Stopped).await?;
        }
        Ok(outcome)
    }

    pub(super) async fn patch_run_strategy(
        &self,
        key: &VmKey,
        strategy: &str,
        op: &'static str,
    ) -> Result<(), BackendError> {
        let vm = self.vm(key).ok_or_else(|| BackendError::NotFound(key.clone()))?;
        let mut spec = json!({ "runStrategy": strategy });
        if vm.spec.running.is_some() {
            // `running` and `runStrategy` are mutually exclusive: drop the deprecated one.
            spec["running"] = serde_json::Value::Null;
        }
        let patch = json!({ "spec": spec });
        self.vm_api(key)
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| self.api_error(key, op, e))
    }

    pub(super) async fn subresource(&self, key: &VmKey, action: &'static str) -> Result<(), BackendError> {
        if !self.config.pause {
            return Err(BackendError::Unsupported(action));
        }
        let url = format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{}/virtualmachineinstances/{}/{action}",
            key.namespace, key.name
        );
        let request = http::Request::put(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(b"{}".to_vec())
            .map_err(|e| BackendError::Failed {
                op: action,
                message: e.to_string(),
            })?;
        self.client
            .request_text(request)
            .await
            .map(|_| ())
            .map_err(|e| self.api_error(key, action, e))
    }

    /// Records this replica's activity `at` on the target, unless a record at most a
    /// tenth of the idle timeout older is there already.
    pub(super) async fn write_activity(&self, key: &VmKey, at: SystemTime) -> Result<(), BackendError> {
        let target = self.target(key)?;
        // Any replica's record younger than a tenth of the idle timeout is as good as
        // ours: skip the write, so writes per VM stay bounded however many replicas
        // see traffic. (It also never moves the shared clock backwards.)
        let every = self
            .catalog
            .borrow()
            .get(key)
            .map(|policy| policy.idle_timeout / 10)
            .unwrap_or_default();
        if self
            .latest_activity(key, target.annotations())
            .is_some_and(|(_, recorded)| recorded + every >= at)
        {
            return Ok(());
        }
        let value = humantime::format_rfc3339_millis(at).to_string();
        let written = value.clone();
        let patch = json!({ "metadata": { "annotations": { LAST_ACTIVITY_ANNOTATION: value } } });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        match target {
            Target::Vm(_) => self.vm_api(key).patch(&key.name, &params, &patch).await.map(|_| ()),
            Target::Workload { kind, .. } => self
                .workload_api(kind, &key.namespace)
                .patch(&key.name, &params, &patch)
                .await
                .map(|_| ()),
        }
        .map_err(|e| self.api_error(key, "record activity", e))?;
        let mut own = self.own_activity.lock().expect("own activity lock");
        own.insert(key.clone(), (written, at));
        Ok(())
    }

    /// The newer of the activity record in the store and the one this replica last
    /// wrote. The store lags behind the server by the watch's delay; a record we wrote
    /// is what the server held when we wrote it, so under load (or a slow watch) the
    /// compare-and-stop tests the right value at the first try instead of failing on its
    /// own write and trying again an idle check later. A peer's later record wins once
    /// the store has it; one the store has not seen yet makes the compare fail, as it
    /// must.
    fn latest_activity(&self, key: &VmKey, annotations: &BTreeMap<String, String>) -> Option<(String, SystemTime)> {
        let stored = recorded_activity(annotations);
        let own = self.own_activity.lock().expect("own activity lock").get(key).cloned();
        match (stored, own) {
            (Some(stored), Some(own)) => Some(if own.1 > stored.1 { own } else { stored }),
            (stored, own) => stored.or(own),
        }
    }

    /// One atomic JSON patch that halts the VM only if the activity record still reads
    /// `recorded` and the run strategy is what this replica saw: it fails (422) if any
    /// replica recorded activity, or anyone changed the run strategy, meanwhile. The idle
    /// history handed over since the last one (`history`) is written in the same patch.
    pub(super) async fn compare_and_stop(
        &self,
        key: &VmKey,
        vm: &VirtualMachine,
        recorded: &str,
        history: Option<&str>,
    ) -> Result<StopOutcome, BackendError> {
        let patch: json_patch::Patch =
            serde_json::from_value(compare_and_stop_ops(vm, recorded, history)).map_err(|e| BackendError::Failed {
                op: "stop",
                message: e.to_string(),
            })?;
        match self
            .vm_api(key)
            .patch(&key.name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => Ok(StopOutcome::Stopped),
            Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => {
                tracing::info!(vm = %key, "a peer saw activity (compare-and-stop failed); keeping the VM");
                Ok(StopOutcome::PeerActive)
            }
            Err(e) => Err(self.api_error(key, "stop", e)),
        }
    }
}

/// The operations of the compare-and-stop patch for `vm`, whose activity record reads
/// `recorded`, storing `history` if there is one. A VM still on the deprecated
/// `spec.running` moves to `runStrategy`.
fn compare_and_stop_ops(vm: &VirtualMachine, recorded: &str, history: Option<&str>) -> serde_json::Value {
    let mut ops = vec![json!({ "op": "test", "path": LAST_ACTIVITY_POINTER, "value": recorded })];
    ops.extend(history.map(idle_history_op));
    match (&vm.spec.run_strategy, vm.spec.running) {
        (Some(strategy), _) => ops.extend([
            json!({ "op": "test", "path": "/spec/runStrategy", "value": strategy }),
            json!({ "op": "replace", "path": "/spec/runStrategy", "value": "Halted" }),
        ]),
        (None, Some(running)) => ops.extend([
            json!({ "op": "test", "path": "/spec/running", "value": running }),
            json!({ "op": "remove", "path": "/spec/running" }),
            json!({ "op": "add", "path": "/spec/runStrategy", "value": "Halted" }),
        ]),
        (None, None) => ops.push(json!({ "op": "add", "path": "/spec/runStrategy", "value": "Halted" })),
    }
    serde_json::Value::Array(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kubevirt::VirtualMachineSpec;

    #[test]
    fn the_compare_and_stop_tests_the_record_and_the_strategy_it_saw() {
        let vm = |run_strategy: Option<&str>, running: Option<bool>| {
            VirtualMachine::new(
                "demo",
                VirtualMachineSpec {
                    run_strategy: run_strategy.map(str::to_string),
                    running,
                    template: None,
                },
            )
        };
        let at = "2026-12-01T10:00:00.000Z";
        let ops = compare_and_stop_ops(&vm(Some("Always"), None), at, None);
        assert_eq!(
            ops,
            json!([
                { "op": "test", "path": "/metadata/annotations/vm-activator.io~1last-activity", "value": at },
                { "op": "test", "path": "/spec/runStrategy", "value": "Always" },
                { "op": "replace", "path": "/spec/runStrategy", "value": "Halted" },
            ])
        );
        let history = "v1 bin=1m oob=0 gaps=14:3";
        let with_history = compare_and_stop_ops(&vm(Some("Always"), None), at, Some(history));
        assert_eq!(
            with_history[1],
            json!({ "op": "add", "path": "/metadata/annotations/vm-activator.io~1idle-history", "value": history })
        );
        assert_eq!(with_history.as_array().unwrap().len(), 4, "one patch: the same write");
        let legacy = compare_and_stop_ops(&vm(None, Some(true)), at, None);
        assert_eq!(legacy[2], json!({ "op": "remove", "path": "/spec/running" }));
        assert_eq!(legacy[3]["value"], "Halted");
        assert!(serde_json::from_value::<json_patch::Patch>(legacy).is_ok());
    }
}
