//! Kubernetes Events on each target object — what `kubectl describe vm` shows: scale-ups
//! (with the CloudEvent that caused them), readiness with the cold start's phases,
//! scale-downs, failed and timed-out starts, and bad annotations.
//!
//! Published through kube-rs's `Recorder` (events.k8s.io/v1; a repeat of the same reason
//! within its cache window becomes a series patch, not a new object), by one task fed
//! through a bounded queue: recording never waits and never fails the caller. A per-VM
//! token bucket (a burst of `BURST`, then one per `REFILL`) keeps a VM whose starts keep
//! failing from turning into a flood of API writes; what is over the cap or the queue is
//! dropped and counted in the log. The reporting controller is `vm-activator`, the
//! instance the pod (`POD_NAME`, else `HOSTNAME`). RBAC: `create` and `patch` on
//! `events.k8s.io` `events`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::targets::{targets_named, Target};
use super::KubevirtBackend;
use crate::backend::VmEvent;
use crate::vm::VmKey;

/// Events waiting to be published, at most.
const QUEUE: usize = 1024;
/// Events a VM may publish at once.
const BURST: f64 = 10.0;
/// Then one more per this long.
const REFILL: Duration = Duration::from_secs(6);
/// The API server refuses longer notes.
const MAX_NOTE: usize = 1024;

/// The queue to the publishing task, and each VM's allowance.
pub(super) struct EventSink {
    queue: mpsc::Sender<(ObjectReference, Event)>,
    buckets: Mutex<HashMap<VmKey, (f64, Instant)>>,
}

impl EventSink {
    /// A sink whose task publishes with `client`; the task ends when the sink is dropped.
    pub(super) fn start(client: Client) -> (EventSink, tokio::task::JoinHandle<()>) {
        let (queue, mut events) = mpsc::channel::<(ObjectReference, Event)>(QUEUE);
        let instance = std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).ok();
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "vm-activator".into(),
                instance,
            },
        );
        let task = tokio::spawn(async move {
            while let Some((reference, event)) = events.recv().await {
                if let Err(error) = recorder.publish(&event, &reference).await {
                    tracing::debug!(object = ?reference.name, reason = %event.reason, %error, "event not published");
                }
            }
        });
        let sink = EventSink {
            queue,
            buckets: Mutex::new(HashMap::new()),
        };
        (sink, task)
    }

    /// Whether `key` may publish one more event now (and takes it).
    fn allow(&self, key: &VmKey) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = buckets.entry(key.clone()).or_insert((BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() / REFILL.as_secs_f64()).min(BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn send(&self, key: &VmKey, reference: ObjectReference, event: Event) {
        if !self.allow(key) {
            tracing::debug!(vm = %key, reason = %event.reason, "event over the per-VM rate cap; dropped");
            return;
        }
        if self.queue.try_send((reference, event)).is_err() {
            tracing::debug!(vm = %key, "event queue full; dropped");
        }
    }
}

impl KubevirtBackend {
    /// Queues `event` for `key`'s target (nothing if it has none, or an ambiguous name).
    pub(super) fn publish_event(&self, key: &VmKey, event: &VmEvent) {
        let Some(reference) = self.reference(key) else {
            return;
        };
        self.events.send(key, reference, kube_event(event));
    }

    /// A Warning on the target for annotations that were replaced by defaults.
    pub(super) fn warn_bad_annotations(&self, key: &VmKey, warnings: &[String]) {
        if warnings.is_empty() {
            return;
        }
        let Some(reference) = self.reference(key) else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "BadAnnotation".into(),
            note: Some(note(format!("{} (the defaults are used instead)", warnings.join("; ")))),
            action: "ReadPolicy".into(),
            secondary: None,
        };
        self.events.send(key, reference, event);
    }

    /// The object `key` stands for, if exactly one.
    fn reference(&self, key: &VmKey) -> Option<ObjectReference> {
        let found = targets_named(self, key);
        let [target] = found.as_slice() else {
            return None;
        };
        Some(match target {
            Target::Vm(vm) => vm.object_ref(&()),
            Target::Workload { kind, object } => {
                let resource = &self.workloads[*kind].resource;
                ObjectReference {
                    api_version: Some(resource.api_version.clone()),
                    kind: Some(resource.kind.clone()),
                    name: Some(object.name_any()),
                    namespace: object.namespace(),
                    uid: object.uid(),
                    resource_version: object.resource_version(),
                    ..Default::default()
                }
            }
        })
    }
}

/// The Kubernetes Event for a VM event: its reason, and its message as the note.
fn kube_event(event: &VmEvent) -> Event {
    Event {
        type_: if event.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason().into(),
        note: Some(note(event.message())),
        action: event.action().into(),
        secondary: None,
    }
}

/// `text` cut to what the API server accepts, on a character boundary.
fn note(mut text: String) -> String {
    if text.len() > MAX_NOTE {
        let mut cut = MAX_NOTE - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_sentences() {
        let up = kube_event(&VmEvent::ScaledUp {
            kind: "boot",
            trigger: Some(crate::backend::Trigger {
                id: "e-1".into(),
                source: "/orders".into(),
                ..Default::default()
            }),
            held: 3,
            predicted: false,
        });
        assert_eq!((up.reason.as_str(), up.action.as_str()), ("ScaledUp", "Start"));
        assert_eq!(
            up.note.as_deref(),
            Some("started (boot) for CloudEvent id=e-1 source=/orders; 3 event(s) held")
        );
        let predicted = kube_event(&VmEvent::ScaledUp {
            kind: "boot",
            trigger: None,
            held: 0,
            predicted: true,
        });
        assert_eq!(
            predicted.note.as_deref(),
            Some("started (boot) ahead of the next event, as the adaptive idle policy predicts it; 0 event(s) held")
        );
        let down = kube_event(&VmEvent::ScaledDown {
            action: "hibernate",
            idle_for: Duration::from_millis(90_500),
        });
        assert_eq!(down.reason, "Hibernated");
        assert_eq!(down.note.as_deref(), Some("hibernate after 1m 30s without events"));
        let failed = kube_event(&VmEvent::StartTimedOut {
            after: Duration::from_secs(120),
            answered: 7,
        });
        assert_eq!(failed.type_, EventType::Warning);
        assert_eq!(
            failed.note.as_deref(),
            Some("not ready within 2m; 7 held event(s) answered 503")
        );
        assert_eq!(note("é".repeat(600)).len(), 1023);
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_gets_a_burst_then_one_event_per_refill() {
        let (queue, _published) = mpsc::channel(QUEUE);
        let sink = EventSink {
            queue,
            buckets: Mutex::new(HashMap::new()),
        };
        let (flooding, quiet) = (VmKey::new("apps", "flaky"), VmKey::new("apps", "quiet"));
        let allowed = (0..100).filter(|_| sink.allow(&flooding)).count();
        assert_eq!(allowed, BURST as usize, "a flood of failures is capped");
        assert!(sink.allow(&quiet), "per VM: another VM is not affected");
        tokio::time::advance(REFILL).await;
        assert!(sink.allow(&flooding));
        assert!(!sink.allow(&flooding));
    }
}
