//! The idle scaler: one task that periodically finds VMs whose last activity is older
//! than their idle timeout and that have nothing in flight or held, closes their gate
//! (a compare-and-set in the gate, so a request arriving at that instant either got in
//! first or is held and restarts the VM), and asks the backend to stop or pause them.
//!
//! Owns: the scale-down policy (stop, pause, pause-then-stop).
//! Must not import HTTP, `ingress`, `server`, or any backend implementation.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::{Instant, MissedTickBehavior};

use crate::activator::Activator;
use crate::backend::{BackendError, StopOutcome};
use crate::gate::Gate;
use crate::vm::{ScaleDown, VmPhase};

/// What to do with a VM in this phase under this policy, and after how much idleness.
fn plan(phase: VmPhase, scale_down: ScaleDown, idle_timeout: Duration) -> Option<(Action, Duration)> {
    match (phase, scale_down) {
        (VmPhase::Ready, ScaleDown::Stop) => Some((Action::Stop, idle_timeout)),
        (VmPhase::Ready, ScaleDown::Pause | ScaleDown::PauseThenStop) => Some((Action::Pause, idle_timeout)),
        // Paused once for `idle_timeout` already: stop after a second one.
        (VmPhase::Paused, ScaleDown::PauseThenStop) => Some((Action::Stop, idle_timeout * 2)),
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Stop,
    Pause,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Pause => "pause",
        }
    }
}

/// Runs the scaler until the task is dropped.
pub async fn run(activator: Arc<Activator>, check_interval: Duration) {
    let mut tick = tokio::time::interval(check_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        check_once(&activator).await;
    }
}

/// One pass over every VM. Scale-downs run concurrently so one slow stop (a guest
/// ignoring ACPI power-down for its grace period) does not delay the others.
pub async fn check_once(activator: &Arc<Activator>) {
    let mut stops = tokio::task::JoinSet::new();
    for gate in activator.gates() {
        let policy = gate.policy();
        let Some((action, idle_for)) = plan(gate.phase(), policy.scale_down, policy.idle_timeout) else {
            continue;
        };
        // Another replica may be feeding this VM: not idle while any replica's recorded
        // activity is recent. (Stops are also compare-and-set in the backend.)
        if let Some(shared) = activator.backend().shared_activity(gate.key()) {
            if SystemTime::now().duration_since(shared).unwrap_or_default() < idle_for {
                continue;
            }
        }
        if gate.begin_stop(idle_for).is_none() {
            continue;
        }
        let activator = activator.clone();
        stops.spawn(async move { scale_down(&activator, gate, action).await });
    }
    while stops.join_next().await.is_some() {}
}

async fn scale_down(activator: &Arc<Activator>, gate: Arc<Gate>, action: Action) {
    let key = gate.key().clone();
    let backend = activator.backend();
    tracing::info!(vm = %key, action = action.as_str(), "VM idle; scaling down");
    let mut done = action;
    // This replica's last activity on the wall clock, for the shared record.
    let local_activity = SystemTime::now() - Instant::now().saturating_duration_since(gate.last_activity());
    let result = match action {
        Action::Stop => match backend.stop_if_idle(&key, local_activity).await {
            Ok(StopOutcome::Stopped) => Ok(()),
            Ok(StopOutcome::PeerActive) => {
                if let Some(opened) = gate.abort_stop() {
                    opened.release(&gate).await;
                }
                return;
            }
            Err(e) => Err(e),
        },
        Action::Pause => match backend.pause(&key).await {
            Err(BackendError::Unsupported(_)) => {
                tracing::warn!(vm = %key, "backend cannot pause; stopping instead");
                done = Action::Stop;
                backend.stop(&key).await
            }
            other => other,
        },
    };
    let to = match result {
        Ok(()) => {
            gate.metrics().scaled_down(done.as_str());
            match done {
                Action::Stop => VmPhase::Stopped,
                Action::Pause => VmPhase::Paused,
            }
        }
        Err(error) => {
            // The VM may still be running: `Failed` makes the next request go through a
            // start (a no-op on a running VM) and a probe before it gets traffic.
            tracing::warn!(vm = %key, %error, "scale-down failed");
            VmPhase::Failed
        }
    };
    if let Some(kind) = gate.finish_stop(to) {
        tracing::info!(vm = %key, "requests arrived while scaling down; starting again");
        activator.spawn_start(gate, kind);
    } else {
        // A policy change waits for the VM to stop; apply it now.
        let catalog = backend.catalog().borrow().clone();
        activator.sync_catalog(&catalog);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::{FakeBackend, FakeOptions};
    use crate::config::ReadinessConfig;
    use crate::metrics::Metrics;
    use crate::readiness::Prober;
    use crate::vm::{Policy, VmKey};

    fn setup(scale_down: ScaleDown) -> (Arc<FakeBackend>, Arc<Activator>, Arc<Gate>) {
        let key = VmKey::new("ns", "vm");
        let policy = Policy {
            idle_timeout: Duration::from_secs(30),
            scale_down,
            ..Policy::default()
        };
        let backend = FakeBackend::new([(key.clone(), policy)], FakeOptions::default());
        let activator = Activator::new(backend.clone(), Prober::new(ReadinessConfig::default()), Metrics::new());
        let gate = activator.gate("ns", "vm").unwrap();
        // Bring the gate to Ready by hand: these tests are about the scaler, not starts.
        let (_held, _) = gate.hold(0).unwrap();
        gate.open("127.0.0.1:9".parse().unwrap()).unwrap();
        (backend, activator, gate)
    }

    #[test]
    fn plan_covers_every_policy() {
        let t = Duration::from_secs(10);
        assert_eq!(plan(VmPhase::Ready, ScaleDown::Stop, t), Some((Action::Stop, t)));
        assert_eq!(plan(VmPhase::Ready, ScaleDown::Pause, t), Some((Action::Pause, t)));
        assert_eq!(plan(VmPhase::Paused, ScaleDown::Pause, t), None);
        assert_eq!(
            plan(VmPhase::Paused, ScaleDown::PauseThenStop, t),
            Some((Action::Stop, t * 2))
        );
        assert_eq!(plan(VmPhase::Starting, ScaleDown::Stop, t), None);
    }

    #[tokio::test(start_paused = true)]
    async fn stops_a_vm_only_after_its_idle_timeout() {
        let (backend, activator, gate) = setup(ScaleDown::Stop);
        gate.touch();
        tokio::time::advance(Duration::from_secs(29)).await;
        check_once(&activator).await;
        assert_eq!(backend.stops(gate.key()), 0);
        assert_eq!(gate.phase(), VmPhase::Ready);
        tokio::time::advance(Duration::from_secs(2)).await;
        check_once(&activator).await;
        assert_eq!(backend.stops(gate.key()), 1);
        assert_eq!(gate.phase(), VmPhase::Stopped);
        let text = activator.metrics().render();
        assert!(text.contains("vm_activator_scale_downs_total{action=\"stop\",namespace=\"ns\",vm=\"vm\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn never_stops_a_vm_with_a_request_in_flight() {
        let (backend, activator, gate) = setup(ScaleDown::Stop);
        let guard = gate.try_enter().unwrap();
        tokio::time::advance(Duration::from_secs(120)).await;
        check_once(&activator).await;
        assert_eq!(backend.stops(gate.key()), 0);
        drop(guard);
        tokio::time::advance(Duration::from_secs(31)).await;
        check_once(&activator).await;
        assert_eq!(backend.stops(gate.key()), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_falls_back_to_stop_when_the_backend_cannot_pause() {
        let (backend, activator, gate) = setup(ScaleDown::Pause);
        tokio::time::advance(Duration::from_secs(31)).await;
        check_once(&activator).await;
        assert_eq!(backend.stops(gate.key()), 1);
        assert_eq!(gate.phase(), VmPhase::Stopped);
    }
}
