//! The adaptive idle policy in the owner's life, on the paused clock with one-second
//! bins: a VM fed one event every 20 s learns the period, is scaled down between events
//! and started just before each; an unused pre-warm ends at its window; a stored history
//! pre-warms a VM nobody sent anything to.

use super::*;
use crate::idle_policy::{History, IdlePolicy, Settings};

const SEC: Duration = Duration::from_secs(1);
const PERIOD: Duration = Duration::from_secs(20);

fn rules() -> IdleRules {
    IdleRules {
        recheck: SEC,
        default_policy: IdlePolicy::Fixed,
        adaptive: Settings {
            bin: SEC,
            range: SEC * 240,
            min_keep_alive: SEC,
            max_keep_alive: SEC * 240,
            cold_start_cost: SEC * 50,
            min_samples: 3,
        },
    }
}

fn adaptive() -> Policy {
    Policy {
        idle_timeout: Duration::from_secs(10),
        idle_policy: Some(IdlePolicy::Adaptive),
        ..policy()
    }
}

/// A world whose VM runs as soon as it is started and whose guest answers at once.
fn running_world(policy: Policy) -> World {
    let w = world_with(policy, rules());
    *w.backend.runs_at_once.lock().unwrap() = true;
    w.probe.up.send_replace(true);
    w
}

/// Delivers one event; returns whether it found the VM ready.
async fn event(w: &World) -> bool {
    let warm = w.phase() == VmPhase::Ready;
    let permit = w.admit();
    settle().await;
    drop(permit.await.unwrap().expect("admitted"));
    settle().await;
    warm
}

/// Lets the rest of one period pass after an event (which took 2 ms), in steps (timers
/// fire when they are due, as in real time, not all at its end). The next event comes
/// 10 ms before the period is over: never at the very instant a window ends.
async fn rest_of_period() {
    pass(PERIOD / 2).await;
    pass(PERIOD / 2 - Duration::from_millis(13)).await;
}

fn count(w: &World, call: &str) -> usize {
    w.backend.calls().iter().filter(|c| **c == call).count()
}

fn prewarms(w: &World, outcome: &str) -> u64 {
    let series = format!("vm_activator_prewarm_total{{namespace=\"ns\",outcome=\"{outcome}\",vm=\"vm\"}} ");
    w.metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn a_periodic_vm_learns_its_period_then_is_down_between_events_and_ready_for_each() {
    let w = running_world(adaptive());
    let mut warm = Vec::new();
    for _ in 0..10 {
        warm.push(event(&w).await);
        // Down between events: scaled down long before the next one.
        pass(PERIOD / 2).await;
        assert_eq!(
            w.phase(),
            VmPhase::Stopped,
            "event {}: {:?}",
            warm.len(),
            w.backend.calls()
        );
        pass(PERIOD / 2 - Duration::from_millis(13)).await;
    }
    // The first event, then three idle periods on the 10 s fallback: cold. From then on
    // every event finds the VM ready, started just ahead of it.
    assert_eq!(warm, [false, false, false, false, true, true, true, true, true, true]);
    assert_eq!(
        count(&w, "start"),
        11,
        "one start per event, cold or predicted, and one for the next"
    );
    assert_eq!(count(&w, "stop_if_idle"), 10, "scaled down after each");
    assert_eq!(prewarms(&w, "used"), 6);
    assert_eq!(prewarms(&w, "unused"), 0);
    let decision = w.vm.idle_decision().expect("adaptive");
    assert!(decision.learned);
    assert_eq!(decision.samples, 9);
    assert_eq!(decision.keep_alive, SEC, "scaled down one bin after its activity");
}

#[tokio::test(start_paused = true)]
async fn each_idle_scale_down_hands_the_history_over() {
    let w = running_world(adaptive());
    for _ in 0..3 {
        event(&w).await;
        rest_of_period().await;
    }
    let handed = w.backend.idle_histories.lock().unwrap().clone();
    assert_eq!(handed.len(), 3, "{handed:?}");
    let last = History::parse(handed.last().unwrap()).unwrap();
    assert_eq!(last.bin(), SEC);
    assert_eq!(last.gaps().collect::<Vec<_>>(), vec![(19, 2)], "two gaps of 20 s");
    assert!(last.last_activity().is_some());
    assert!(last.cold_start().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_prewarm_no_event_comes_to_ends_with_its_window_and_counts_unused() {
    let w = running_world(adaptive());
    for _ in 0..5 {
        event(&w).await;
        rest_of_period().await;
    }
    assert!(event(&w).await, "learned");
    let starts = count(&w, "start");
    // The next event does not come: the pre-warm starts it, its window ends, it stops.
    rest_of_period().await;
    assert_eq!(count(&w, "start"), starts + 1, "pre-warmed");
    pass(PERIOD).await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert_eq!(prewarms(&w, "unused"), 1);
    // Nothing else is predicted before the next event: the owner rests.
    pass(PERIOD * 10).await;
    assert_eq!(count(&w, "start"), starts + 1);
    assert!(!w.vm.owner_running());
    assert!(!event(&w).await, "an event nobody predicted is a cold start");
}

#[tokio::test(start_paused = true)]
async fn a_stored_history_prewarms_a_vm_this_replica_never_saw_traffic_for() {
    // Another replica (or this one before a restart) wrote the history: one event every
    // 20 s, the last activity 5 s ago.
    let mut history = History::new(SEC);
    for _ in 0..6 {
        history.record(PERIOD, &rules().adaptive);
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(WALL_START);
    history.set_last_activity(now - SEC * 5);
    history.set_cold_start(Duration::from_millis(500));
    let policy = Policy {
        idle_history: Some(Arc::new(history)),
        ..adaptive()
    };
    let w = running_world(policy.clone());
    assert!(w.vm.needs_owner(&policy), "the registry runs its owner");
    w.vm.set_policy(Arc::new(policy));
    settle().await;
    let next =
        w.vm.idle_decision()
            .unwrap()
            .next_prewarm
            .expect("a pre-warm is planned");
    // Ready at 19 s after the activity, started a cold start and a quarter bin ahead.
    assert_eq!(next, now - SEC * 5 + SEC * 19 - Duration::from_millis(750));
    pass(SEC * 13).await;
    assert!(w.backend.calls().is_empty(), "{:?}", w.backend.calls());
    pass(SEC).await;
    assert_eq!(w.backend.calls(), ["start"]);
    assert_eq!(w.phase(), VmPhase::Ready);
    assert!(event(&w).await, "the event finds it ready");
    assert_eq!(prewarms(&w, "used"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_scale_down_that_ends_inside_the_next_window_starts_the_vm_at_once() {
    let w = running_world(adaptive());
    for _ in 0..5 {
        event(&w).await;
        rest_of_period().await;
    }
    assert!(event(&w).await, "learned");
    // The stop takes 19 s: when it is done, the next window has begun.
    w.backend.stops_blocked.send_replace(true);
    pass(SEC * 2).await;
    assert_eq!(w.phase(), VmPhase::Stopping);
    pass(SEC * 17).await;
    let starts = count(&w, "start");
    w.backend.stops_blocked.send_replace(false);
    settle().await;
    assert_eq!(
        count(&w, "start"),
        starts + 1,
        "started again at once: {:?}",
        w.backend.calls()
    );
    settle().await;
    assert!(event(&w).await);
}

#[tokio::test(start_paused = true)]
async fn after_an_operator_s_stop_nothing_is_prewarmed_until_the_next_event() {
    let w = running_world(adaptive());
    for _ in 0..5 {
        event(&w).await;
        rest_of_period().await;
    }
    assert!(event(&w).await, "learned");
    w.vm.scale_down(Action::Stop).await.unwrap();
    settle().await;
    let starts = count(&w, "start");
    pass(PERIOD * 3).await;
    assert_eq!(count(&w, "start"), starts, "no pre-warm after the operator's stop");
    assert!(!event(&w).await);
    // Activity again: the plan is back in force.
    rest_of_period().await;
    assert!(event(&w).await, "pre-warmed for the next one");
}

#[tokio::test(start_paused = true)]
async fn a_fixed_vm_learns_nothing() {
    let w = running_world(policy());
    event(&w).await;
    pass(PERIOD * 3).await;
    event(&w).await;
    assert!(w.vm.idle_decision().is_none());
    assert!(w.backend.idle_histories.lock().unwrap().is_empty());
}
