//! Writes on workloads through their `/scale` subresource.
//!
//! Scale up: one PATCH of `/scale` to the count remembered at the last scale-down
//! (annotation `vm-activator.io/scaled-down-from`), else `vm-activator.io/replicas`, else
//! 1 — with the resourceVersion the activator saw as a precondition, so a scale someone
//! made meanwhile is followed (409 → re-read; already above zero → nothing to do), never
//! undone. A workload already above zero is not touched.
//!
//! Scale down (compare-and-scale-down, the workload twin of the VM's compare-and-stop):
//! 1. one JSON patch of the object that `test`s the activity record (and the replica count
//!    the activator saw) and records that count in `scaled-down-from` — it fails (422) if a
//!    peer recorded activity or someone rescaled meanwhile;
//! 2. one PATCH of `/scale` to 0 with the resourceVersion step 1 returned — it fails (409)
//!    if anything changed in between. The workload's controller writing its status is
//!    such a change (and, on a busy control plane, a frequent one): on a 409 the object
//!    is read again, and if its activity record and replica count are still what step 1
//!    wrote against, the `/scale` patch is made again with the new resourceVersion
//!    (at most `SCALE_ATTEMPTS` times).
//!
//! A failed step 1, or a changed record or count, means "a peer is active": the workload
//! keeps running.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;

use super::workloads::{remembered_replicas, replicas};
use super::writes::{idle_history_op, LAST_ACTIVITY_POINTER};
use super::KubevirtBackend;
use crate::backend::{BackendError, StopOutcome};
use crate::vm::VmKey;

/// JSON pointer to the remembered replica count.
const SCALED_DOWN_FROM_POINTER: &str = "/metadata/annotations/vm-activator.io~1scaled-down-from";

/// How often a scale-up meets a changed object (409) and re-reads before it gives up: a
/// workload's controller rewrites its status — and so its resourceVersion — several times
/// while it scales, and each of those is a 409 for a write that raced it.
const SCALE_ATTEMPTS: u32 = 5;

impl KubevirtBackend {
    /// The API of the `kind`-th workload kind in `namespace`.
    pub(super) fn workload_api(&self, kind: usize, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.workloads[kind].resource)
    }

    /// Scales a workload at zero up to its remembered count (see the module header).
    pub(super) async fn scale_up(&self, key: &VmKey, kind: usize, object: &DynamicObject) -> Result<(), BackendError> {
        if replicas(object) > 0 {
            return Ok(());
        }
        let configured = self.catalog.borrow().get(key).and_then(|policy| policy.replicas);
        let to = remembered_replicas(object).or(configured).unwrap_or(1);
        let api = self.workload_api(kind, &key.namespace);
        let mut seen = object.resource_version();
        for _ in 0..SCALE_ATTEMPTS {
            match patch_scale(&api, &key.name, to, seen.as_deref()).await {
                Ok(()) => {
                    tracing::info!(target = %key, replicas = to, "scaled up");
                    return Ok(());
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // Changed since the store saw it — most often only its status (a
                    // controller writing it bumps the resourceVersion too). Re-read: a
                    // scale made meanwhile is followed, a status change is tried again.
                    let scale = api
                        .get_scale(&key.name)
                        .await
                        .map_err(|e| self.api_error(key, "start", e))?;
                    if scale.spec.and_then(|s| s.replicas).unwrap_or(0) > 0 {
                        return Ok(());
                    }
                    seen = scale.metadata.resource_version;
                }
                Err(e) => return Err(self.api_error(key, "start", e)),
            }
        }
        Err(BackendError::Failed {
            op: "start",
            message: "the workload kept changing while it was being scaled up".into(),
        })
    }

    /// Scales a workload to zero, remembering its count (and storing `history`, the idle
    /// history handed over, in the same patch); with `recorded`, only if the activity
    /// record still reads that (see the module header).
    pub(super) async fn scale_down(
        &self,
        key: &VmKey,
        kind: usize,
        object: &DynamicObject,
        recorded: Option<&str>,
        history: Option<&str>,
    ) -> Result<StopOutcome, BackendError> {
        let count = replicas(object);
        if count == 0 {
            return Ok(StopOutcome::Stopped);
        }
        let api = self.workload_api(kind, &key.namespace);
        let ops = scale_down_ops(object, count, recorded, history);
        let patch: json_patch::Patch = serde_json::from_value(ops).map_err(|e| BackendError::Failed {
            op: "stop",
            message: e.to_string(),
        })?;
        let remembered = match api
            .patch(&key.name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(object) => object,
            Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => {
                tracing::info!(target = %key, "a peer saw activity or the workload was rescaled; keeping it");
                return Ok(StopOutcome::PeerActive);
            }
            Err(e) => return Err(self.api_error(key, "stop", e)),
        };
        let mut seen = remembered.resource_version();
        for _ in 0..SCALE_ATTEMPTS {
            match patch_scale(&api, &key.name, 0, seen.as_deref()).await {
                Ok(()) => {
                    tracing::info!(target = %key, from = count, "scaled to zero");
                    return Ok(StopOutcome::Stopped);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // Changed since step 1: a status write goes on; anything else — a
                    // peer's activity record, a new count — calls the scale-down off.
                    let current = api.get(&key.name).await.map_err(|e| self.api_error(key, "stop", e))?;
                    let activity = current.annotations().get(crate::vm::LAST_ACTIVITY_ANNOTATION);
                    if replicas(&current) != count || recorded.is_some_and(|r| activity.map(String::as_str) != Some(r))
                    {
                        tracing::info!(target = %key, "the workload changed while scaling down; keeping it");
                        return Ok(StopOutcome::PeerActive);
                    }
                    seen = current.resource_version();
                }
                Err(e) => return Err(self.api_error(key, "stop", e)),
            }
        }
        tracing::info!(target = %key, "the workload kept changing while scaling down; keeping it");
        Ok(StopOutcome::PeerActive)
    }
}

/// PATCH `/scale` to `replicas`, on condition that the object is still at `seen`.
async fn patch_scale(
    api: &Api<DynamicObject>,
    name: &str,
    replicas: u32,
    seen: Option<&str>,
) -> Result<(), kube::Error> {
    let mut patch = json!({ "spec": { "replicas": replicas } });
    if let Some(seen) = seen {
        patch["metadata"] = json!({ "resourceVersion": seen });
    }
    api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Step 1 of the scale-down: test what was seen, remember the count (and the idle
/// history).
fn scale_down_ops(
    object: &DynamicObject,
    count: u64,
    recorded: Option<&str>,
    history: Option<&str>,
) -> serde_json::Value {
    let mut ops = Vec::new();
    if let Some(recorded) = recorded {
        ops.push(json!({ "op": "test", "path": LAST_ACTIVITY_POINTER, "value": recorded }));
    }
    if object.data["spec"]["replicas"].is_u64() {
        ops.push(json!({ "op": "test", "path": "/spec/replicas", "value": count }));
    }
    if object.metadata.annotations.is_none() {
        ops.push(json!({ "op": "add", "path": "/metadata/annotations", "value": {} }));
    }
    ops.push(json!({ "op": "add", "path": SCALED_DOWN_FROM_POINTER, "value": count.to_string() }));
    ops.extend(history.map(idle_history_op));
    serde_json::Value::Array(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kubevirt::workloads::api_resource;
    use crate::config::ScaleKind;

    #[test]
    fn the_scale_down_tests_what_it_saw_and_remembers_the_count() {
        let mut object = DynamicObject::new("web", &api_resource(&ScaleKind::deployment())).within("apps");
        object.data = json!({"spec": {"replicas": 3}});
        object.metadata.annotations = Some(Default::default());
        let at = "2026-12-01T10:00:00.000Z";
        assert_eq!(
            scale_down_ops(&object, 3, Some(at), None),
            json!([
                { "op": "test", "path": "/metadata/annotations/vm-activator.io~1last-activity", "value": at },
                { "op": "test", "path": "/spec/replicas", "value": 3 },
                { "op": "add", "path": "/metadata/annotations/vm-activator.io~1scaled-down-from", "value": "3" },
            ])
        );
        object.metadata.annotations = None;
        let ops = scale_down_ops(&object, 3, None, Some("v1 bin=1m oob=0 gaps="));
        assert_eq!(
            ops[1],
            json!({ "op": "add", "path": "/metadata/annotations", "value": {} })
        );
        assert_eq!(
            ops[3],
            json!({ "op": "add", "path": "/metadata/annotations/vm-activator.io~1idle-history", "value": "v1 bin=1m oob=0 gaps=" })
        );
        assert!(serde_json::from_value::<json_patch::Patch>(ops).is_ok());
    }
}
