//! Watches of opted-in VirtualMachines and of VirtualMachineInstances, kept in
//! reflector stores, and what they feed: the catalog (policies from annotations) and
//! the per-VM status channels. After an error the watch re-lists after a short backoff.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};

use super::status::derive_status;
use super::{KubevirtBackend, VirtualMachine};
use crate::backend::BackendStatus;
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
    /// One watcher per configured namespace (or one cluster-wide), merged.
    pub(super) fn watch_all<K>(&self, labels: Option<String>) -> WatchStream<K>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        // MostRecent: the initial list is paginated (500 objects a page, from etcd), so
        // thousands of VMs are never one response held in memory at once; `Any` would be
        // served from the watch cache, which ignores the page size.
        let mut wc = watcher::Config::default().list_semantic(watcher::ListSemantic::MostRecent);
        if let Some(labels) = &labels {
            wc = wc.labels(labels);
        }
        let apis: Vec<Api<K>> = if self.config.namespaces.is_empty() {
            vec![Api::all(self.client.clone())]
        } else {
            self.config
                .namespaces
                .iter()
                .map(|ns| Api::namespaced(self.client.clone(), ns))
                .collect()
        };
        futures_util::stream::select_all(
            apis.into_iter()
                .map(move |api| watcher(api, wc.clone()).modify(keep_what_is_read).boxed()),
        )
        .boxed()
    }

    /// Rebuilds the catalog from the VM store (after a (re-)list); publishes it if it
    /// changed. Unchanged policies keep their `Arc`, shared with the gates.
    pub(super) fn refresh_catalog(&self) {
        let current = self.catalog.borrow().clone();
        let catalog: BTreeMap<VmKey, Arc<Policy>> = self
            .vms
            .state()
            .iter()
            .filter_map(|vm| {
                let key = VmKey::new(vm.namespace()?, vm.name_any());
                let policy = policy_of(vm);
                let policy = match current.get(&key) {
                    Some(same) if **same == policy => same.clone(),
                    _ => {
                        log_warnings(&key, &policy);
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

    /// Updates one VM's catalog entry after a watch event: O(log n), not a rebuild, so
    /// activity annotations written on thousands of VMs cost little.
    pub(super) fn refresh_catalog_entry(&self, key: &VmKey) {
        let policy = self.vm(key).map(|vm| policy_of(&vm));
        self.catalog.send_if_modified(|current| match policy {
            Some(policy) if current.get(key).is_some_and(|p| **p == policy) => false,
            Some(policy) => {
                log_warnings(key, &policy);
                Arc::make_mut(current).insert(key.clone(), Arc::new(policy));
                true
            }
            None => current.contains_key(key) && Arc::make_mut(current).remove(key).is_some(),
        });
    }

    /// One VM's status as the stores show it now.
    pub(super) fn current_status(&self, key: &VmKey) -> BackendStatus {
        let vm = self.vm(key);
        let vmi = self.vmis.get(&ObjectRef::new(&key.name).within(&key.namespace));
        let port = vm.as_ref().map(|vm| policy_of(vm).port).unwrap_or(8080);
        derive_status(vm.as_deref(), vmi.as_deref(), port)
    }

    /// Recomputes one VM's status from the stores; publishes it if it changed. Only VMs
    /// someone asked about (`Backend::status`) have a channel: thousands of idle VMs
    /// cost nothing here.
    pub(super) fn refresh_status(&self, key: &VmKey) {
        if !self.statuses.lock().expect("statuses lock").contains_key(key) {
            return;
        }
        let status = self.current_status(key);
        let mut statuses = self.statuses.lock().expect("statuses lock");
        let Some(sender) = statuses.get_mut(key) else {
            return;
        };
        sender.send_if_modified(|current| {
            if *current == status {
                return false;
            }
            tracing::debug!(vm = %key, phase = ?status.phase, endpoints = ?status.endpoints, "VM status");
            *current = status;
            true
        });
    }

    pub(super) fn refresh_all(&self) {
        self.refresh_catalog();
        let keys: Vec<VmKey> = self.statuses.lock().expect("statuses lock").keys().cloned().collect();
        for key in keys {
            self.refresh_status(&key);
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Kind {
    Vm,
    Vmi,
}

type WatchStream<K> = futures_util::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

/// Keeps one store in step with the API server until the backend is dropped, and
/// reports whether it is synced. After an error (other than 410 Gone, which the watcher
/// handles by re-listing) the watch is started afresh after a backoff, so it re-lists
/// as client-go's reflectors do: a resumed watch with no news would never tell us that
/// the API server is back.
pub(super) async fn drive<K>(
    backend: std::sync::Weak<KubevirtBackend>,
    mut writer: reflector::store::Writer<K>,
    kind: Kind,
    watch: impl Fn(&KubevirtBackend) -> WatchStream<K>,
) where
    K: Resource<DynamicType = ()> + ResourceExt + Clone + 'static,
{
    let mut backoff = ReconnectBackoff::default();
    loop {
        let Some(mut stream) = backend.upgrade().map(|b| watch(&b)) else {
            return;
        };
        while let Some(item) = stream.next().await {
            let Some(backend) = backend.upgrade() else {
                return;
            };
            let synced = match kind {
                Kind::Vm => &backend.health.vms_synced,
                Kind::Vmi => &backend.health.vmis_synced,
            };
            match item {
                Ok(event) => {
                    writer.apply_watcher_event(&event);
                    match event {
                        watcher::Event::InitDone => {
                            backoff = ReconnectBackoff::default();
                            if !synced.swap(true, Ordering::SeqCst) {
                                tracing::info!(kind = kind_name(kind), "watch synced");
                            }
                            backend.refresh_all();
                        }
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        watcher::Event::Apply(obj) | watcher::Event::Delete(obj) => {
                            let key = VmKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
                            if matches!(kind, Kind::Vm) {
                                backend.refresh_catalog_entry(&key);
                            }
                            backend.refresh_status(&key);
                        }
                    }
                }
                // 410 Gone: the watch fell behind; the watcher re-lists on its own and the
                // store stays consistent meanwhile. Not an outage.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::info!(kind = kind_name(kind), "watch expired (410); re-listing");
                }
                Err(error) => {
                    if synced.swap(false, Ordering::SeqCst) {
                        tracing::warn!(kind = kind_name(kind), %error, "lost the Kubernetes API");
                    } else {
                        tracing::debug!(kind = kind_name(kind), %error, "Kubernetes API still unreachable");
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(backoff.next().unwrap_or(BACKOFF_MAX)).await;
    }
}

/// Drops what the stores never read before they keep an object: managedFields (often
/// the largest part), labels (selection is done by the API server), and annotations
/// other than ours (`kubectl.kubernetes.io/last-applied-configuration` alone holds a
/// copy of the object). Memory at thousands of VMs.
fn keep_what_is_read<K: Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
    object.labels_mut().clear();
    object
        .annotations_mut()
        .retain(|key, _| key.starts_with(crate::vm::ANNOTATION_PREFIX));
}

/// A VM's policy from its annotations.
pub(super) fn policy_of(vm: &VirtualMachine) -> Policy {
    Policy::from_annotations(vm.annotations().iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

/// Bad annotations are logged once per change of a VM's policy, not on every event.
fn log_warnings(key: &VmKey, policy: &Policy) {
    for warning in &policy.warnings {
        tracing::warn!(vm = %key, %warning, "bad annotation");
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Vm => "VirtualMachine",
        Kind::Vmi => "VirtualMachineInstance",
    }
}
