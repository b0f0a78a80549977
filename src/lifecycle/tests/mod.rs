//! The owner's commands and events, one scenario each, against a scripted backend and
//! a scripted guest probe under tokio's paused clock: deterministic, no sockets.
//! This file is the harness; `up.rs` has the way up, `down.rs` the way down.

mod adaptive;
mod down;
mod endpoints;
mod up;
mod warm;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::backend::{Backend, BackendError, BackendPhase, BackendStatus, Catalog, StopOutcome};
use crate::metrics::Metrics;
use crate::readiness::{Attempts, GuestProbe};
use crate::vm::{Readiness, ScaleDown};

/// A backend whose calls are recorded and whose answers and status the test sets.
struct Scripted {
    catalog: watch::Sender<Catalog>,
    status: watch::Sender<BackendStatus>,
    calls: Mutex<Vec<&'static str>>,
    start_error: Mutex<Option<String>>,
    /// `start` panics (a bug in a backend).
    start_panics: Mutex<bool>,
    /// `stop_if_idle` panics (a bug in a backend, in the owner's own task).
    stop_panics: Mutex<bool>,
    pause_supported: Mutex<bool>,
    hibernate_supported: Mutex<bool>,
    /// What `restored` says after a start.
    restores: Mutex<bool>,
    stop_outcome: Mutex<StopOutcome>,
    /// A peer stops the VM while this replica's compare-and-stop is called off.
    peer_stops: Mutex<bool>,
    /// While true, stops do not return.
    stops_blocked: watch::Sender<bool>,
    /// Report the VM running (at `endpoint()`) as soon as it is started.
    runs_at_once: Mutex<bool>,
    /// Idle histories handed over, in order.
    idle_histories: Mutex<Vec<String>>,
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
        if *self.start_panics.lock().unwrap() {
            panic!("scripted: start panics");
        }
        if let Some(message) = self.start_error.lock().unwrap().clone() {
            return Err(BackendError::Failed { op: "start", message });
        }
        if *self.runs_at_once.lock().unwrap() {
            self.report(BackendPhase::Running, Some(endpoint()));
        }
        Ok(())
    }

    fn record_idle_history(&self, _: &VmKey, history: &str) {
        self.idle_histories.lock().unwrap().push(history.to_string());
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

    async fn hibernate(&self, _: &VmKey) -> Result<(), BackendError> {
        if !*self.hibernate_supported.lock().unwrap() {
            return Err(BackendError::Unsupported("hibernate"));
        }
        self.record("hibernate");
        self.report(BackendPhase::Hibernated, None);
        Ok(())
    }

    fn restored(&self, _: &VmKey) -> bool {
        *self.restores.lock().unwrap()
    }

    async fn stop_if_idle(&self, _: &VmKey, _: SystemTime) -> Result<StopOutcome, BackendError> {
        self.record("stop_if_idle");
        if *self.stop_panics.lock().unwrap() {
            panic!("scripted: stop_if_idle panics");
        }
        let outcome = *self.stop_outcome.lock().unwrap();
        if outcome == StopOutcome::Stopped {
            self.stopped().await;
        } else if *self.peer_stops.lock().unwrap() {
            // A peer's stop made our compare-and-stop fail: the owner sees it stopped
            // while its own stop is still in progress.
            self.stopped().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
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
        self.report_endpoints(phase, endpoint.into_iter().collect());
    }

    fn report_endpoints(&self, phase: BackendPhase, endpoints: Vec<Endpoint>) {
        self.status.send_replace(BackendStatus {
            phase,
            endpoints,
            message: None,
        });
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

/// A guest probe that passes once the test says the guest is up — except at the
/// endpoints it lists as down.
struct ScriptedProbe {
    up: watch::Sender<bool>,
    down: watch::Sender<Vec<Endpoint>>,
    /// How each probe was asked to make its attempts, in order.
    attempts: Mutex<Vec<Attempts>>,
}

#[async_trait]
impl GuestProbe for ScriptedProbe {
    async fn wait_ready(&self, endpoint: Endpoint, _: &Readiness, attempts: Attempts) {
        self.attempts.lock().unwrap().push(attempts);
        let (mut up, mut down) = (self.up.subscribe(), self.down.subscribe());
        loop {
            if *up.borrow_and_update() && !down.borrow_and_update().contains(&endpoint) {
                return;
            }
            tokio::select! {
                _ = up.changed() => {}
                _ = down.changed() => {}
            }
        }
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
/// The test wall clock's start: Tuesday 2026-12-01 06:00:00 UTC, in seconds.
const WALL_START: u64 = 1_796_104_800;
const START: Duration = Duration::from_secs(10);

fn world(policy: Policy) -> World {
    world_with(policy, IdleRules::fixed(Duration::from_secs(1)))
}

fn world_with(policy: Policy, rules: IdleRules) -> World {
    let backend = Arc::new(Scripted {
        catalog: watch::channel(Catalog::default()).0,
        status: watch::channel(BackendStatus::stopped()).0,
        calls: Mutex::default(),
        start_error: Mutex::default(),
        start_panics: Mutex::new(false),
        stop_panics: Mutex::new(false),
        pause_supported: Mutex::new(true),
        hibernate_supported: Mutex::new(true),
        restores: Mutex::new(false),
        stop_outcome: Mutex::new(StopOutcome::Stopped),
        peer_stops: Mutex::new(false),
        stops_blocked: watch::channel(false).0,
        runs_at_once: Mutex::new(false),
        idle_histories: Mutex::default(),
    });
    let probe = Arc::new(ScriptedProbe {
        up: watch::channel(false).0,
        down: watch::channel(Vec::new()).0,
        attempts: Mutex::default(),
    });
    let metrics = Metrics::new();
    let key = VmKey::new("ns", "vm");
    // The wall clock moves with tokio's paused clock, from Tuesday 2026-12-01 06:00 UTC.
    let started = tokio::time::Instant::now();
    let wall_clock: WallClock =
        Arc::new(move || SystemTime::UNIX_EPOCH + Duration::from_secs(WALL_START) + started.elapsed());
    let context = Context::with_wall_clock(backend.clone(), probe.clone(), rules, wall_clock);
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

/// Moves the paused clock by `time`, then lets every task run.
async fn pass(time: Duration) {
    tokio::time::advance(time).await;
    settle().await;
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
        self.comes_up().await;
        first.await.unwrap().expect("admitted")
    }

    /// The started VM runs and its guest answers the probe: it is Ready.
    async fn comes_up(&self) {
        self.backend.report(BackendPhase::Running, Some(endpoint()));
        self.probe.up.send_replace(true);
        settle().await;
        assert_eq!(self.phase(), VmPhase::Ready);
    }

    /// Observations of one cold-start phase.
    fn phase_count(&self, phase: &str) -> u64 {
        let series =
            format!("vm_activator_cold_start_phase_seconds_count{{namespace=\"ns\",phase=\"{phase}\",vm=\"vm\"}} ");
        self.metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    fn scale_downs(&self, action: &str) -> bool {
        self.metrics.render().contains(&format!(
            "vm_activator_scale_downs_total{{action=\"{action}\",namespace=\"ns\",vm=\"vm\"}} 1"
        ))
    }
}
