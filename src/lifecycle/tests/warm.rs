//! Keep-warm schedules on the paused clock (the wall clock moves with it, from Tuesday
//! 2026-12-01 06:00 UTC): started ahead of each window, never idle-stopped inside one.

use super::*;

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

fn warm_policy(schedule: &str) -> Policy {
    Policy {
        keep_warm: Some(Arc::new(schedule.parse().unwrap())),
        ..policy()
    }
}

/// Registers the VM as the registry does for a policy with a schedule: its owner runs.
fn register(w: &World) {
    w.vm.set_policy(w.vm.gate().policy());
}

/// The guest comes up for a start nobody waits on.
async fn guest_comes_up(w: &World) {
    w.backend.report(BackendPhase::Running, Some(endpoint()));
    w.probe.up.send_replace(true);
    settle().await;
}

#[tokio::test(start_paused = true)]
async fn a_window_starts_the_vm_ahead_and_keeps_it_until_the_window_ends() {
    let w = world(warm_policy("daily 08:00-09:00 UTC"));
    register(&w);
    settle().await;
    // 07:59:00: no cold start measured yet, so the lead is 30 s + 10 s: not yet.
    pass(HOUR + 59 * MINUTE).await;
    assert!(w.backend.calls().is_empty(), "{:?}", w.backend.calls());
    assert_eq!(w.phase(), VmPhase::Stopped);
    // 07:59:30: started, with nobody waiting.
    pass(Duration::from_secs(30)).await;
    assert_eq!(w.backend.calls(), ["start"]);
    guest_comes_up(&w).await;
    assert_eq!(w.phase(), VmPhase::Ready);

    // 08:29:30, far past its idle timeout, inside the window: still up.
    pass(30 * MINUTE).await;
    assert_eq!(w.phase(), VmPhase::Ready);
    assert_eq!(w.backend.calls(), ["start"]);
    // 09:00: the window ends; the VM has been idle all along: stopped.
    pass(30 * MINUTE + Duration::from_secs(31)).await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);

    // The next morning the lead is the measured cold start (0 s here) + 10 s.
    pass(22 * HOUR + 59 * MINUTE + Duration::from_secs(44)).await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"], "07:59:45: not yet");
    pass(Duration::from_secs(10)).await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle", "start"]);
}

#[tokio::test(start_paused = true)]
async fn outside_a_window_the_idle_timeout_applies() {
    let w = world(warm_policy("Mon-Fri 08:00-18:00 UTC"));
    register(&w);
    // 06:00, two hours before the window: an event starts it, and it idles out as usual.
    drop(w.bring_up().await);
    pass(IDLE + Duration::from_secs(1)).await;
    assert_eq!(w.phase(), VmPhase::Stopped);
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);
    assert!(w.vm.owner_running(), "its owner waits for the window");
}

#[tokio::test(start_paused = true)]
async fn inside_a_window_a_hibernated_vm_is_restored_at_once() {
    let w = world(Policy {
        scale_down: ScaleDown::Hibernate,
        ..warm_policy("daily 06:00-07:00 UTC")
    });
    // Already inside the window when registered: started at once.
    register(&w);
    settle().await;
    assert_eq!(w.backend.calls(), ["start"]);
    guest_comes_up(&w).await;
    // 07:00: hibernated once idle; the next window restores it ahead of 06:00.
    pass(HOUR).await;
    assert_eq!(w.phase(), VmPhase::Hibernated);
    *w.backend.restores.lock().unwrap() = true;
    pass(22 * HOUR + 59 * MINUTE + Duration::from_secs(45)).await;
    assert_eq!(
        w.backend.calls(),
        ["start", "hibernate"],
        "05:59:45: not yet (lead 0 s + 10 s)"
    );
    pass(Duration::from_secs(10)).await;
    assert_eq!(w.backend.calls(), ["start", "hibernate", "start"]);
    guest_comes_up(&w).await;
    assert_eq!(w.phase(), VmPhase::Ready);
    assert_eq!(w.phase_count("restore"), 1);
}
