//! The way down: the idle timer, scale-downs, peers calling a stop off, pause tiers,
//! explicit stop and pause, and policy changes waiting for a stop.

use super::*;

#[tokio::test(start_paused = true)]
async fn the_idle_timer_stops_a_vm_only_after_its_idle_timeout() {
    let w = world(policy());
    drop(w.bring_up().await);
    pass(IDLE - Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Ready);
    pass(Duration::from_secs(2)).await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert!(w.scale_downs("stop"));
    assert!(!w.vm.owner_running());
}

#[tokio::test(start_paused = true)]
async fn the_idle_timer_never_stops_a_vm_with_a_request_in_flight() {
    let w = world(policy());
    let permit = w.bring_up().await;
    pass(IDLE * 4).await;
    assert_eq!(w.phase(), VmPhase::Ready);
    drop(permit);
    pass(IDLE - Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Ready, "idle counts from the request's end");
    pass(Duration::from_secs(2)).await;
    assert_eq!(w.phase(), VmPhase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_peer_s_activity_calls_the_stop_off_and_the_vm_stays_warm() {
    let w = world(policy());
    drop(w.bring_up().await);
    *w.backend.stop_outcome.lock().unwrap() = StopOutcome::PeerActive;
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);
    assert_eq!(w.phase(), VmPhase::Ready);
    assert!(w.vm.gate().try_enter().is_some(), "warm again");
}

#[tokio::test(start_paused = true)]
async fn a_stop_called_off_by_a_peer_s_own_stop_leaves_the_vm_stopped_and_it_boots_again() {
    let w = world(policy());
    drop(w.bring_up().await);
    *w.backend.stop_outcome.lock().unwrap() = StopOutcome::PeerActive;
    *w.backend.peer_stops.lock().unwrap() = true;
    pass(IDLE + Duration::from_secs(1)).await;
    pass(Duration::from_secs(1)).await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);
    assert_eq!(w.phase(), VmPhase::Stopped, "not Ready at an endpoint that is gone");
    assert!(w.vm.gate().try_enter().is_none());
    let next = w.admit();
    settle().await;
    assert_eq!(
        w.backend.calls(),
        ["start", "stop_if_idle", "start"],
        "the next event boots it"
    );
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    settle().await;
    assert!(next.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn pause_then_stop_pauses_then_stops_and_a_called_off_stop_stays_paused() {
    let w = world(Policy {
        scale_down: ScaleDown::PauseThenStop,
        ..policy()
    });
    drop(w.bring_up().await);
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Paused);
    assert!(w.scale_downs("pause"));
    *w.backend.stop_outcome.lock().unwrap() = StopOutcome::PeerActive;
    pass(IDLE * 2).await;
    assert_eq!(w.backend.calls(), ["start", "pause", "stop_if_idle"]);
    assert_eq!(w.phase(), VmPhase::Paused, "back to Paused, not stuck in Stopping");
    *w.backend.stop_outcome.lock().unwrap() = StopOutcome::Stopped;
    pass(IDLE * 2).await;
    assert_eq!(w.phase(), VmPhase::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_paused_vm_resumes_instead_of_booting() {
    let w = world(Policy {
        scale_down: ScaleDown::Pause,
        ..policy()
    });
    drop(w.bring_up().await);
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Paused);
    assert!(!w.vm.owner_running(), "nothing to do while paused for good");
    let held = w.admit();
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "pause", "resume"]);
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    assert!(held.await.unwrap().is_ok());
    assert_eq!(
        *w.probe.attempts.lock().unwrap(),
        [Attempts::Overlapping, Attempts::OneAtATime],
        "a booting guest is probed with overlapping attempts, a resumed one one at a time"
    );
}

#[tokio::test(start_paused = true)]
async fn pause_or_hibernate_fall_back_to_stop_when_the_backend_cannot_do_them() {
    for scale_down in [ScaleDown::Pause, ScaleDown::Hibernate] {
        let w = world(Policy { scale_down, ..policy() });
        *w.backend.pause_supported.lock().unwrap() = false;
        *w.backend.hibernate_supported.lock().unwrap() = false;
        drop(w.bring_up().await);
        pass(IDLE + Duration::from_secs(1)).await;
        // An idle stop is the compare-and-stop, whatever plan it stands in for.
        assert_eq!(w.backend.calls(), ["start", "stop_if_idle"], "{scale_down}");
        assert_eq!(w.phase(), VmPhase::Stopped, "{scale_down}");
        assert!(w.scale_downs("stop"), "{scale_down}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_hibernated_vm_is_restored_and_stopped_after_a_second_idle_timeout() {
    let w = world(Policy {
        scale_down: ScaleDown::HibernateThenStop,
        ..policy()
    });
    drop(w.bring_up().await);
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.backend.calls(), ["start", "hibernate"]);
    assert_eq!(w.phase(), VmPhase::Hibernated);
    assert!(w.scale_downs("hibernate"));

    // The next event restores it; the restore is its own cold-start phase.
    *w.backend.restores.lock().unwrap() = true;
    let held = w.admit();
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "hibernate", "start"]);
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    assert!(held.await.unwrap().is_ok());
    assert_eq!(w.phase(), VmPhase::Ready);
    assert_eq!(w.phase_count("restore"), 1);
    assert_eq!(w.phase_count("start_call"), 1, "only the first start, a boot, has one");
    assert_eq!(
        *w.probe.attempts.lock().unwrap(),
        [Attempts::Overlapping, Attempts::OneAtATime],
        "a restored guest is probed one attempt at a time"
    );

    // Hibernated again, then a second idle timeout: stopped for good.
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Hibernated);
    pass(IDLE * 2 + Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert_eq!(
        w.backend.calls(),
        ["start", "hibernate", "start", "hibernate", "stop_if_idle"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_restore_the_backend_turned_into_a_boot_counts_as_a_boot() {
    let w = world(Policy {
        scale_down: ScaleDown::Hibernate,
        ..policy()
    });
    drop(w.bring_up().await);
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Hibernated);
    // `restores` stays false: the state was unusable and the backend booted.
    let held = w.admit();
    settle().await;
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    assert!(held.await.unwrap().is_ok());
    assert_eq!(w.phase_count("restore"), 0);
    assert_eq!(w.phase_count("boot"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_during_a_stop_starts_the_vm_again_once_it_is_stopped() {
    let w = world(policy());
    drop(w.bring_up().await);
    w.backend.stops_blocked.send_replace(true);
    pass(IDLE + Duration::from_secs(1)).await;
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
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert_eq!(w.vm.gate().policy().concurrency, 7);
}
