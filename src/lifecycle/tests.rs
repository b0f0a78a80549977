//! The owner's commands and events, one scenario each, against a scripted backend and
//! a scripted guest probe under tokio's paused clock: deterministic, no sockets.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::backend::{BackendError, BackendPhase, BackendStatus, Catalog, StopOutcome};
use crate::metrics::Metrics;
use crate::readiness::GuestProbe;
use crate::vm::{Readiness, ScaleDown};

/// A backend whose calls are recorded and whose answers and status the test sets.
struct Scripted {
    catalog: watch::Sender<Catalog>,
    status: watch::Sender<BackendStatus>,
    calls: Mutex<Vec<&'static str>>,
    start_error: Mutex<Option<String>>,
    pause_supported: Mutex<bool>,
    stop_outcome: Mutex<StopOutcome>,
    /// While true, stops do not return.
    stops_blocked: watch::Sender<bool>,
}

#[async_trait]
impl Backend for Scripted {
    fn catalog(&self) -> watch::Receiver<Catalog> {
        self.catalog.subscribe()
    }

    fn status(&self, _: &VmKey) -> Option<watch::Receiver<BackendStatus>> {
        Some(self.status.subscribe())
    }

    async fn start(&self, _: &VmKey) -> Result<(), BackendError> {
        self.record("start");
        match self.start_error.lock().unwrap().clone() {
            Some(message) => Err(BackendError::Failed { op: "start", message }),
            None => Ok(()),
        }
    }

    async fn resume(&self, _: &VmKey) -> Result<(), BackendError> {
        self.record("resume");
        Ok(())
    }

    async fn stop(&self, _: &VmKey) -> Result<(), BackendError> {
        self.record("stop");
        self.stopped().await;
        Ok(())
    }

    async fn pause(&self, _: &VmKey) -> Result<(), BackendError> {
        if !*self.pause_supported.lock().unwrap() {
            return Err(BackendError::Unsupported("pause"));
        }
        self.record("pause");
        self.report(BackendPhase::Paused, None);
        Ok(())
    }

    async fn stop_if_idle(&self, _: &VmKey, _: SystemTime) -> Result<StopOutcome, BackendError> {
        self.record("stop_if_idle");
        let outcome = *self.stop_outcome.lock().unwrap();
        if outcome == StopOutcome::Stopped {
            self.stopped().await;
        }
        Ok(outcome)
    }
}

impl Scripted {
    fn record(&self, call: &'static str) {
        self.calls.lock().unwrap().push(call);
    }

    async fn stopped(&self) {
        let mut blocked = self.stops_blocked.subscribe();
        let _ = blocked.wait_for(|b| !b).await;
        self.report(BackendPhase::Stopped, None);
    }

    fn report(&self, phase: BackendPhase, endpoint: Option<Endpoint>) {
        self.status.send_replace(BackendStatus {
            phase,
            endpoint,
            message: None,
        });
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

/// A guest probe that passes once the test says the guest is up.
struct ScriptedProbe {
    up: watch::Sender<bool>,
}

#[async_trait]
impl GuestProbe for ScriptedProbe {
    async fn wait_ready(&self, _: Endpoint, _: &Readiness) {
        let _ = self.up.subscribe().wait_for(|up| *up).await;
    }
}

struct World {
    backend: Arc<Scripted>,
    probe: Arc<ScriptedProbe>,
    vm: VmHandle,
    metrics: Metrics,
}

fn endpoint() -> Endpoint {
    "127.0.0.1:9".parse().unwrap()
}

const IDLE: Duration = Duration::from_secs(30);
const START: Duration = Duration::from_secs(10);

fn world(policy: Policy) -> World {
    let backend = Arc::new(Scripted {
        catalog: watch::channel(Catalog::default()).0,
        status: watch::channel(BackendStatus::stopped()).0,
        calls: Mutex::default(),
        start_error: Mutex::default(),
        pause_supported: Mutex::new(true),
        stop_outcome: Mutex::new(StopOutcome::Stopped),
        stops_blocked: watch::channel(false).0,
    });
    let probe = Arc::new(ScriptedProbe {
        up: watch::channel(false).0,
    });
    let metrics = Metrics::new();
    let key = VmKey::new("ns", "vm");
    let context = Context::new(backend.clone(), probe.clone(), Duration::from_secs(1));
    let vm = VmHandle::new(key.clone(), Arc::new(policy), metrics.vm(&key), context);
    World {
        backend,
        probe,
        vm,
        metrics,
    }
}

fn policy() -> Policy {
    Policy {
        idle_timeout: IDLE,
        start_timeout: START,
        ..Policy::default()
    }
}

/// Lets every task run until none can (the paused clock then moves only by 1 ms).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

impl World {
    fn admit(&self) -> JoinHandle<Result<Permit, AdmitError>> {
        let vm = self.vm.clone();
        tokio::spawn(async move { vm.admit(0).await })
    }

    fn phase(&self) -> VmPhase {
        self.vm.gate().phase()
    }

    /// One event brings the VM up: start call, running, probe. Returns its permit.
    async fn bring_up(&self) -> Permit {
        let first = self.admit();
        settle().await;
        self.backend.report(BackendPhase::Running, Some(endpoint()));
        self.probe.up.send_replace(true);
        settle().await;
        assert_eq!(self.phase(), VmPhase::Ready);
        first.await.unwrap().expect("admitted")
    }

    fn scale_downs(&self, action: &str) -> bool {
        self.metrics.render().contains(&format!(
            "vm_activator_scale_downs_total{{action=\"{action}\",namespace=\"ns\",vm=\"vm\"}} 1"
        ))
    }
}

#[tokio::test(start_paused = true)]
async fn activate_starts_once_then_probes_and_releases_in_arrival_order() {
    let w = world(Policy {
        concurrency: 1,
        ..policy()
    });
    let held: Vec<_> = (0..3).map(|_| w.admit()).collect();
    settle().await;
    assert_eq!(w.backend.calls(), ["start"], "one start for the whole burst");
    assert_eq!(w.phase(), VmPhase::Starting);
    assert_eq!(w.vm.gate().held(), (3, 0));
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    settle().await;
    assert_eq!(w.phase(), VmPhase::Probing);
    assert_eq!(w.vm.gate().state().endpoint, Some(endpoint()));
    w.probe.up.send_replace(true);
    settle().await;
    assert_eq!(w.phase(), VmPhase::Ready);
    // One slot: the first request is in, the others wait in order.
    let mut held = held.into_iter();
    let first = held.next().unwrap().await.unwrap().unwrap();
    let (second, third) = (held.next().unwrap(), held.next().unwrap());
    settle().await;
    assert!(!second.is_finished() && !third.is_finished());
    drop(first);
    let second = second.await.unwrap().unwrap();
    settle().await;
    assert!(!third.is_finished(), "released one at a time");
    drop(second);
    drop(third.await.unwrap().unwrap());
    assert!(w.vm.gate().last_cold_start().is_some());
    assert!(w
        .metrics
        .render()
        .contains("vm_activator_cold_start_seconds_count{namespace=\"ns\",vm=\"vm\"} 1"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_call_answers_held_requests_and_stops_what_may_be_half_up() {
    let w = world(policy());
    *w.backend.start_error.lock().unwrap() = Some("no capacity".into());
    let result = w.admit().await.unwrap();
    assert!(matches!(result, Err(AdmitError::StartFailed(m)) if m.contains("no capacity")));
    settle().await;
    assert_eq!(w.phase(), VmPhase::Failed);
    assert!(w.vm.gate().state().last_error.unwrap().contains("no capacity"));
    assert_eq!(w.backend.calls(), ["start", "stop"]);
    *w.backend.start_error.lock().unwrap() = None;
    let retry = w.admit();
    settle().await;
    assert_eq!(
        w.backend.calls(),
        ["start", "stop", "start"],
        "the next request tries again"
    );
    assert_eq!(w.phase(), VmPhase::Starting);
    retry.abort();
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_never_runs_fails_at_the_start_deadline_and_is_stopped() {
    let w = world(policy());
    let held = w.admit();
    settle().await;
    tokio::time::advance(START).await;
    settle().await;
    assert_eq!(held.await.unwrap().unwrap_err(), AdmitError::StartTimeout(START));
    assert_eq!(w.phase(), VmPhase::Failed);
    assert_eq!(w.backend.calls(), ["start", "stop"]);
}

#[tokio::test(start_paused = true)]
async fn a_vm_that_dies_while_starting_answers_at_once() {
    let w = world(policy());
    let held = w.admit();
    settle().await;
    w.backend.report(BackendPhase::Starting, None);
    settle().await;
    w.backend.status.send_replace(BackendStatus {
        message: Some("qemu exited with status 1".into()),
        ..BackendStatus::stopped()
    });
    let result = held.await.unwrap();
    assert!(
        matches!(&result, Err(AdmitError::Stopped(m)) if m.contains("qemu")),
        "{result:?}"
    );
    settle().await;
    assert_eq!(w.phase(), VmPhase::Failed);
}

#[tokio::test(start_paused = true)]
async fn a_ready_vm_that_stops_on_its_own_is_lost_not_stopped_again() {
    let w = world(policy());
    drop(w.bring_up().await);
    w.backend.status.send_replace(BackendStatus {
        message: Some("the VM exited on its own".into()),
        ..BackendStatus::stopped()
    });
    settle().await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert!(w.vm.gate().state().last_error.unwrap().contains("on its own"));
    assert_eq!(w.backend.calls(), ["start"], "no stop for a VM that is already down");
    assert!(!w.vm.owner_running(), "a stopped VM has no owner task");
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_guest_is_reprobed_and_new_requests_wait_for_it() {
    let w = world(policy());
    drop(w.bring_up().await);
    w.probe.up.send_replace(false);
    w.vm.report_unreachable(endpoint());
    settle().await;
    assert_eq!(w.phase(), VmPhase::Probing);
    let held = w.admit();
    settle().await;
    assert!(!held.is_finished(), "no traffic until a probe passes");
    w.probe.up.send_replace(true);
    assert_eq!(held.await.unwrap().unwrap().endpoint(), endpoint());
    assert_eq!(w.phase(), VmPhase::Ready);
    assert_eq!(w.backend.calls(), ["start"]);
}

#[tokio::test(start_paused = true)]
async fn a_guest_with_a_new_address_is_probed_there() {
    let w = world(policy());
    drop(w.bring_up().await);
    let moved: Endpoint = "127.0.0.2:9".parse().unwrap();
    w.backend.report(BackendPhase::Running, Some(moved));
    settle().await;
    assert_eq!(w.phase(), VmPhase::Ready);
    assert_eq!(w.vm.gate().state().endpoint, Some(moved));
}

#[tokio::test(start_paused = true)]
async fn the_idle_timer_stops_a_vm_only_after_its_idle_timeout() {
    let w = world(policy());
    drop(w.bring_up().await);
    tokio::time::advance(IDLE - Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Ready);
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert!(w.scale_downs("stop"));
    assert!(!w.vm.owner_running());
}

#[tokio::test(start_paused = true)]
async fn the_idle_timer_never_stops_a_vm_with_a_request_in_flight() {
    let w = world(policy());
    let permit = w.bring_up().await;
    tokio::time::advance(IDLE * 4).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Ready);
    drop(permit);
    tokio::time::advance(IDLE - Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Ready, "idle counts from the request's end");
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_peer_s_activity_calls_the_stop_off_and_the_vm_stays_warm() {
    let w = world(policy());
    drop(w.bring_up().await);
    *w.backend.stop_outcome.lock().unwrap() = StopOutcome::PeerActive;
    tokio::time::advance(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);
    assert_eq!(w.phase(), VmPhase::Ready);
    assert!(w.vm.gate().try_enter().is_some(), "warm again");
}

#[tokio::test(start_paused = true)]
async fn pause_then_stop_pauses_then_stops_and_a_called_off_stop_stays_paused() {
    let w = world(Policy {
        scale_down: ScaleDown::PauseThenStop,
        ..policy()
    });
    drop(w.bring_up().await);
    tokio::time::advance(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Paused);
    assert!(w.scale_downs("pause"));
    *w.backend.stop_outcome.lock().unwrap() = StopOutcome::PeerActive;
    tokio::time::advance(IDLE * 2).await;
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "pause", "stop_if_idle"]);
    assert_eq!(w.phase(), VmPhase::Paused, "back to Paused, not stuck in Stopping");
    *w.backend.stop_outcome.lock().unwrap() = StopOutcome::Stopped;
    tokio::time::advance(IDLE * 2).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_paused_vm_resumes_instead_of_booting() {
    let w = world(Policy {
        scale_down: ScaleDown::Pause,
        ..policy()
    });
    drop(w.bring_up().await);
    tokio::time::advance(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Paused);
    assert!(!w.vm.owner_running(), "nothing to do while paused for good");
    let held = w.admit();
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "pause", "resume"]);
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    assert!(held.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn pause_falls_back_to_stop_when_the_backend_cannot_pause() {
    let w = world(Policy {
        scale_down: ScaleDown::Pause,
        ..policy()
    });
    *w.backend.pause_supported.lock().unwrap() = false;
    drop(w.bring_up().await);
    tokio::time::advance(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "stop"]);
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert!(w.scale_downs("stop"));
}

#[tokio::test(start_paused = true)]
async fn a_request_during_a_stop_starts_the_vm_again_once_it_is_stopped() {
    let w = world(policy());
    drop(w.bring_up().await);
    w.backend.stops_blocked.send_replace(true);
    tokio::time::advance(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Stopping);
    let held = w.admit();
    settle().await;
    assert!(!held.is_finished());
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"], "no start while stopping");
    w.probe.up.send_replace(false);
    w.backend.stops_blocked.send_replace(false);
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle", "start"]);
    assert_eq!(w.phase(), VmPhase::Starting);
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    w.probe.up.send_replace(true);
    assert!(held.await.unwrap().is_ok());
    assert!(w
        .metrics
        .render()
        .contains("vm_activator_cold_start_seconds_count{namespace=\"ns\",vm=\"vm\"} 2"));
}

#[tokio::test(start_paused = true)]
async fn explicit_stop_and_pause_scale_down_an_idle_vm_at_once() {
    let w = world(policy());
    assert_eq!(
        w.vm.scale_down(Action::Stop).await,
        Err(ScaleDownRefused::NotApplicable(VmPhase::Stopped, "stop"))
    );
    let permit = w.bring_up().await;
    assert_eq!(
        w.vm.scale_down(Action::Pause).await,
        Err(ScaleDownRefused::Busy { in_flight: 1, held: 0 })
    );
    drop(permit);
    assert_eq!(w.vm.scale_down(Action::Pause).await, Ok(()));
    settle().await;
    assert_eq!(w.phase(), VmPhase::Paused);
    assert_eq!(w.vm.scale_down(Action::Stop).await, Ok(()));
    settle().await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    // An explicit stop is the operator's call: a plain stop, not compare-and-stop.
    assert_eq!(w.backend.calls(), ["start", "pause", "stop"]);
}

#[tokio::test(start_paused = true)]
async fn a_changed_policy_waits_for_the_vm_to_stop() {
    let w = world(policy());
    drop(w.bring_up().await);
    w.vm.set_policy(Arc::new(Policy {
        concurrency: 7,
        ..policy()
    }));
    settle().await;
    assert_eq!(w.vm.gate().policy().concurrency, 0, "a running VM keeps its policy");
    tokio::time::advance(IDLE + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert_eq!(w.vm.gate().policy().concurrency, 7);
}

#[tokio::test(start_paused = true)]
async fn removal_answers_held_requests_and_refuses_later_ones() {
    let w = world(policy());
    let held = w.admit();
    settle().await;
    w.vm.remove();
    let result = held.await.unwrap();
    assert!(
        matches!(&result, Err(AdmitError::Stopped(m)) if m.contains("removed")),
        "{result:?}"
    );
    assert!(matches!(w.vm.admit(0).await, Err(AdmitError::Stopped(_))));
    assert!(!w.vm.owner_running());
}

#[tokio::test(start_paused = true)]
async fn rejecting_held_requests_answers_them_and_every_later_one() {
    let w = world(policy());
    let held = w.admit();
    settle().await;
    w.vm.reject_held(AdmitError::Draining);
    assert_eq!(held.await.unwrap().unwrap_err(), AdmitError::Draining);
    assert_eq!(w.phase(), VmPhase::Starting, "the start goes on");
    assert_eq!(w.admit().await.unwrap().unwrap_err(), AdmitError::Draining);
}

#[tokio::test(start_paused = true)]
async fn a_held_request_gives_up_at_its_deadline_and_frees_its_place() {
    let w = world(Policy {
        max_buffered: 1,
        ..policy()
    });
    let held = w.admit();
    settle().await;
    assert!(matches!(
        w.vm.admit(0).await,
        Err(AdmitError::BufferFull { count: 1, .. })
    ));
    tokio::time::advance(START).await;
    assert_eq!(held.await.unwrap().unwrap_err(), AdmitError::StartTimeout(START));
    assert_eq!(w.vm.gate().held(), (0, 0));
}
