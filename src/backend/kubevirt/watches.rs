//! The watches — opted-in VirtualMachines, VirtualMachineInstances, opted-in workloads
//! of each kind, pods — kept in reflector stores, and what they feed: the catalog
//! (policies from annotations) and the per-name status channels. After an error a watch
//! re-lists after a short backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::reflector;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};

use super::KubevirtBackend;
use crate::vm::{Policy, VmKey};

/// Retry delays for a watch that lost the API server: 250 ms doubling to at most 5 s,
/// each shortened by up to a quarter at random so replicas do not retry in step. (kube's
/// default grows to 30 s, which would keep `/readyz` failing long after the API is back.)
struct ReconnectBackoff {
    next: Duration,
}

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Default for ReconnectBackoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Iterator for ReconnectBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        // Cheap jitter from the clock's sub-second nanoseconds; no RNG needed for this.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = delay.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Some(delay - jitter)
    }
}

impl KubevirtBackend {
    /// One API per configured namespace (or one cluster-wide), from `api(namespace)`.
    pub(super) fn apis<K>(&self, api: impl Fn(Option<&str>) -> Api<K>) -> Vec<Api<K>> {
        if self.config.namespaces.is_empty() {
            vec![api(None)]
        } else {
            self.config.namespaces.iter().map(|ns| api(Some(ns))).collect()
        }
    }

    /// One watcher per API, merged; each object goes through `keep` before it is stored.
    pub(super) fn watch_all<K>(&self, apis: Vec<Api<K>>, labels: Option<String>, keep: fn(&mut K)) -> WatchStream<K>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + std::hash::Hash,
    {
        // MostRecent: the initial list is paginated (500 objects a page, from etcd), so
        // thousands of VMs are never one response held in memory at once; `Any` would be
        // served from the watch cache, which ignores the page size.
        // The server ends each watch after `watch_timeout` (it resumes from its version);
        // the watcher restarts one that stays silent for 5 s longer.
        let timeout = self.config.watch_timeout.as_secs().clamp(5, 290) as u32;
        let mut wc = watcher::Config::default()
            .list_semantic(watcher::ListSemantic::MostRecent)
            .timeout(timeout);
        if let Some(labels) = &labels {
            wc = wc.labels(labels);
        }
        futures_util::stream::select_all(
            apis.into_iter()
                .map(move |api| watcher(api, wc.clone()).modify(keep).boxed()),
        )
        .boxed()
    }

    /// Rebuilds the catalog from the stores (after a (re-)list); publishes it if it
    /// changed. Unchanged policies keep their `Arc`, shared with the gates.
    pub(super) fn refresh_catalog(&self) {
        let _writing = self.catalog_writes.lock().expect("catalog lock");
        let current = self.catalog.borrow().clone();
        let mut keys: BTreeSet<VmKey> = self
            .vms
            .state()
            .iter()
            .filter_map(|vm| Some(VmKey::new(vm.namespace()?, vm.name_any())))
            .collect();
        for workloads in &self.workloads {
            keys.extend(
                workloads
                    .store
                    .state()
                    .iter()
                    .filter_map(|w| Some(VmKey::new(w.namespace()?, w.name_any()))),
            );
        }
        let catalog: BTreeMap<VmKey, Arc<Policy>> = keys
            .into_iter()
            .filter_map(|key| {
                let policy = self.policy_for(&key)?;
                let policy = match current.get(&key) {
                    Some(same) if **same == policy => same.clone(),
                    before => {
                        self.note_warnings(&key, before.map(|p| &p.warnings), &policy);
                        Arc::new(policy)
                    }
                };
                Some((key, policy))
            })
            .collect();
        self.catalog.send_if_modified(|current| {
            if **current == catalog {
                return false;
            }
            *current = Arc::new(catalog);
            true
        });
    }

    /// Updates one name's catalog entry after a watch event: O(log n), not a rebuild, so
    /// activity annotations written on thousands of VMs cost little.
    pub(super) fn refresh_catalog_entry(&self, key: &VmKey) {
        let _writing = self.catalog_writes.lock().expect("catalog lock");
        let policy = self.policy_for(key);
        self.catalog.send_if_modified(|current| match policy {
            Some(policy) if current.get(key).is_some_and(|p| **p == policy) => false,
            Some(policy) => {
                self.note_warnings(key, current.get(key).map(|p| &p.warnings), &policy);
                Arc::make_mut(current).insert(key.clone(), Arc::new(policy));
                true
            }
            None => current.contains_key(key) && Arc::make_mut(current).remove(key).is_some(),
        });
    }

    /// Recomputes one name's status from the stores; publishes it if it changed. Only
    /// names someone asked about (`Backend::status`) have a channel: thousands of idle
    /// VMs cost nothing here.
    pub(super) fn refresh_status(&self, key: &VmKey) {
        // Computed while holding the lock: watches of different kinds refresh from their
        // own tasks, and a status computed before another watch's change must not be
        // sent after the status computed from it (the newer one would be lost).
        let mut statuses = self.statuses.lock().expect("statuses lock");
        let Some(sender) = statuses.get_mut(key) else {
            return;
        };
        let status = self.current_status(key);
        sender.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            tracing::debug!(target = %key, phase = ?status.phase, endpoints = ?status.endpoints, message = ?status.message, "backend status");
            *current = status;
            true
        });
    }

    /// A pod changed: every watched name in its namespace may have gained or lost an
    /// endpoint (a pod's labels say which workload it is, and may change).
    pub(super) fn refresh_namespace(&self, namespace: &str) {
        let keys: Vec<VmKey> = self
            .statuses
            .lock()
            .expect("statuses lock")
            .keys()
            .filter(|key| key.namespace == namespace)
            .cloned()
            .collect();
        for key in keys {
            self.refresh_status(&key);
        }
    }

    pub(super) fn refresh_all(&self) {
        self.refresh_catalog();
        let keys: Vec<VmKey> = self.statuses.lock().expect("statuses lock").keys().cloned().collect();
        for key in keys {
            self.refresh_status(&key);
        }
    }
}

/// One watch: its name (for logs) and whether it is synced (for `/readyz`).
pub(super) struct WatchHealth {
    pub(super) name: String,
    pub(super) synced: AtomicBool,
}

impl WatchHealth {
    pub(super) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            synced: AtomicBool::new(false),
        }
    }
}

pub(super) type WatchStream<K> = futures_util::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// Keeps one store in step with the API server until the backend is dropped, and
/// reports whether it is synced (`backend.health[watch]`); `on_change` runs for every
/// object added, changed or deleted. After an error (other than 410 Gone, which the
/// watcher handles by re-listing) the watch is started afresh after a backoff, so it
/// re-lists as client-go's reflectors do: a resumed watch with no news would never tell
/// us that the API server is back.
pub(super) async fn drive<K>(
    backend: std::sync::Weak<KubevirtBackend>,
    mut writer: reflector::store::Writer<K>,
    watch: usize,
    stream: impl Fn(&KubevirtBackend) -> WatchStream<K>,
    on_change: fn(&KubevirtBackend, &K),
) where
    K: Resource + ResourceExt + Clone + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash,
{
    let mut backoff = ReconnectBackoff::default();
    loop {
        let Some(mut items) = backend.upgrade().map(|b| stream(&b)) else {
            return;
        };
        while let Some(item) = items.next().await {
            let Some(backend) = backend.upgrade() else {
                return;
            };
            let health = &backend.health[watch];
            match item {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    match event {
                        watcher::Event::InitDone => {
                            backoff = ReconnectBackoff::default();
                            if !health.synced.swap(true, Ordering::SeqCst) {
                                tracing::info!(kind = %health.name, "watch synced");
                            }
                            backend.refresh_all();
                        }
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        watcher::Event::Apply(obj) | watcher::Event::Delete(obj) => on_change(&backend, &obj),
                    }
                }
                // 410 Gone: the watch fell behind; the watcher re-lists on its own and the
                // store stays consistent meanwhile. Not an outage.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::info!(kind = %health.name, "watch expired (410); re-listing");
                }
                Err(error) => {
                    if health.synced.swap(false, Ordering::SeqCst) {
                        tracing::warn!(kind = %health.name, %error, "lost the Kubernetes API");
                    } else {
                        tracing::debug!(kind = %health.name, %error, "Kubernetes API still unreachable");
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(BACKOFF_MAX)).await;
    }
}

/// The key of a watched object.
pub(super) fn key_of<K: ResourceExt>(object: &K) -> VmKey {
    VmKey::new(object.namespace().unwrap_or_default(), object.name_any())
}

/// Drops what the stores never read before they keep an object: managedFields (often
/// the largest part), labels (selection is done by the API server), and annotations
/// other than ours (`kubectl.kubernetes.io/last-applied-configuration` alone holds a
/// copy of the object). Memory at thousands of VMs.
pub(super) fn keep_what_is_read<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.labels = None;
    // An object without annotations stays without: a JSON patch adding one must know.
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|key, _| key.starts_with(crate::vm::ANNOTATION_PREFIX));
    }
}

/// Workloads: what every object keeps, and of the rest only replicas and selector.
pub(super) fn keep_workload(object: &mut kube::api::DynamicObject) {
    keep_what_is_read(object);
    super::workloads::keep_workload_fields(object);
}

/// Bad annotations are logged once per change of them, not on every event — nor on each
/// write of the activator's own annotations (activity, idle history).
impl KubevirtBackend {
    /// A new policy's warnings, unless they are the ones `before` had: logged, and a
    /// Warning Event on the target.
    fn note_warnings(&self, key: &VmKey, before: Option<&Vec<String>>, policy: &Policy) {
        if before == Some(&policy.warnings) {
            return;
        }
        for warning in &policy.warnings {
            tracing::warn!(vm = %key, %warning, "bad annotation");
        }
        self.warn_bad_annotations(key, &policy.warnings);
    }
}
