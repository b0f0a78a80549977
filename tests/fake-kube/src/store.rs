//! The objects, their resourceVersions, and the history watches replay from.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Value};

use crate::{GuestLog, Inner, Recorded, Res};

pub(crate) type Key = (Res, String, String);

#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) res: Res,
    pub(crate) kind: &'static str,
    pub(crate) object: Value,
    pub(crate) old: Option<Value>,
    /// When it was made (watches may pass it on `Options::watch_delay` later).
    pub(crate) at: tokio::time::Instant,
}

#[derive(Default)]
pub(crate) struct Store {
    pub(crate) rv: u64,
    pub(crate) objects: BTreeMap<Key, Value>,
    pub(crate) history: VecDeque<Change>,
    /// Watches from versions older than this get 410 Gone.
    pub(crate) compacted: u64,
}

impl Inner {
    /// Every object of `res` in `namespace`.
    pub(crate) fn list(&self, res: Res, namespace: &str) -> Vec<Value> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|((r, ns, _), _)| *r == res && ns == namespace)
            .map(|(_, object)| object.clone())
            .collect()
    }

    pub(crate) fn get(&self, res: Res, namespace: &str, name: &str) -> Option<Value> {
        let store = self.store.lock().unwrap();
        store
            .objects
            .get(&(res, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Creates, replaces (`Some`) or deletes (`None`) an object, bumping resourceVersion.
    pub(crate) fn write(&self, res: Res, namespace: &str, name: &str, object: Option<Value>) -> Option<Value> {
        let mut store = self.store.lock().unwrap();
        let key = (res, namespace.to_string(), name.to_string());
        let old = store.objects.get(&key).cloned();
        store.rv += 1;
        let rv = store.rv;
        let (kind, object) = match object {
            Some(mut object) => {
                object["metadata"]["managedFields"] = managed_fields(&object);
                let meta = &mut object["metadata"];
                meta["resourceVersion"] = json!(rv.to_string());
                match &old {
                    Some(old) => {
                        meta["uid"] = old["metadata"]["uid"].clone();
                        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                        let generation = old["metadata"]["generation"].as_u64().unwrap_or(1);
                        let spec_changed = old.get("spec") != object.get("spec");
                        object["metadata"]["generation"] = json!(generation + u64::from(spec_changed));
                    }
                    None => {
                        meta["uid"] = json!(format!("uid-{rv}"));
                        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                        meta["generation"] = json!(1);
                    }
                }
                store.objects.insert(key, object.clone());
                (if old.is_some() { "MODIFIED" } else { "ADDED" }, object)
            }
            None => {
                let mut object = store.objects.remove(&key)?;
                object["metadata"]["resourceVersion"] = json!(rv.to_string());
                ("DELETED", object)
            }
        };
        let change = Change {
            rv,
            res,
            kind,
            object: object.clone(),
            old,
            at: tokio::time::Instant::now(),
        };
        store.history.push_back(change.clone());
        if store.history.len() > 10_000 {
            store.history.pop_front();
            store.compacted = store.history.front().map(|c| c.rv - 1).unwrap_or(rv);
        }
        // Published under the store's lock, so changes reach watches in version order
        // (a watch skips anything at or below the last version it passed on).
        let _ = self.changes.send(change);
        drop(store);
        Some(object)
    }

    pub(crate) fn guest_log(&self, namespace: &str, name: &str) -> GuestLog {
        self.guest_logs
            .lock()
            .unwrap()
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .clone()
    }

    pub(crate) fn record(&self, recorded: Recorded) {
        self.requests.lock().unwrap().push(recorded);
        self.request_seen.notify_waiters();
    }
}

/// `metadata.managedFields` as kube-apiserver keeps it: every object carries a
/// FieldsV1 tree of the fields its manager set (often larger than the rest of the
/// object's metadata), so a client that caches whole objects pays for it.
pub(crate) fn managed_fields(object: &Value) -> Value {
    fn tree(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, child)| (format!("f:{key}"), tree(child)))
                    .collect(),
            ),
            _ => json!({}),
        }
    }
    let meta = &object["metadata"];
    let fields = json!({
        "f:metadata": {
            "f:labels": tree(&meta["labels"]),
            "f:annotations": tree(&meta["annotations"]),
        },
        "f:spec": tree(&object["spec"]),
        "f:status": tree(&object["status"]),
    });
    json!([{
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "apiVersion": object["apiVersion"],
        "time": "2026-01-01T00:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }])
}
