//! The way up: starts, probes, release, failures, removal and the drain.

use super::*;

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
    assert_eq!(w.vm.gate().state().endpoint(), None, "no traffic before a probe passes");
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
    pass(START).await;
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
    assert_eq!(w.vm.gate().state().endpoint(), Some(moved));
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

/// The owner answers each held request `StartTimeout` once it has waited `start_timeout`
/// — here while waiting for a slot on a Ready VM, the case no start deadline covers —
/// counting from its own arrival, and gives its place back.
#[tokio::test(start_paused = true)]
async fn a_request_held_for_a_slot_times_out_after_its_own_start_timeout() {
    let w = world(Policy {
        concurrency: 1,
        ..policy()
    });
    let busy = w.bring_up().await;
    let early = w.admit();
    settle().await;
    pass(START / 2).await;
    let late = w.admit();
    settle().await;
    assert_eq!(w.vm.gate().held(), (2, 0));
    pass(START / 2).await;
    assert!(early.is_finished(), "answered at its own deadline");
    assert_eq!(early.await.unwrap().unwrap_err(), AdmitError::StartTimeout(START));
    assert!(!late.is_finished(), "counted from its own arrival");
    assert_eq!(w.vm.gate().held(), (1, 0), "the place is given back");
    pass(START / 2).await;
    assert!(late.is_finished(), "answered at its own deadline");
    assert_eq!(late.await.unwrap().unwrap_err(), AdmitError::StartTimeout(START));
    assert_eq!(w.vm.gate().held(), (0, 0));
    assert_eq!(w.phase(), VmPhase::Ready, "a slot wait fails no start");
    drop(busy);
    drop(w.admit().await.unwrap().unwrap());
}

/// The start call is made on the thread of the request that asks for it, before the
/// owners' runtime runs anything: the start signal waits for no other thread to wake.
#[test]
fn a_cold_start_calls_the_backend_before_the_owners_runtime_runs() {
    // The owners' runtime: the context is made on it, and it is never driven again.
    let owners = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let w = owners.block_on(async { world(policy()) });
    let ingress = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    ingress.block_on(async {
        let vm = w.vm.clone();
        let held = tokio::spawn(async move { vm.admit(0).await });
        tokio::task::yield_now().await;
        assert_eq!(w.backend.calls(), ["start"], "started from the request's thread");
        assert_eq!(w.phase(), VmPhase::Starting);
        assert!(!held.is_finished(), "held until the VM is ready");
        held.abort();
    });
}

/// A panic in an owner's first steps (here: the backend's start call, made on the
/// request's thread) is the owner's, as it would be in its own task: the request is
/// answered (503, try again), its caller does not unwind, and the next request's owner
/// takes over — the VM parked as failed, started again — instead of the VM being
/// refused until the process restarts.
#[tokio::test(start_paused = true)]
async fn an_owner_that_panics_in_its_first_steps_answers_the_request_and_is_taken_over() {
    let w = world(policy());
    *w.backend.start_panics.lock().unwrap() = true;
    // In the test's own task: a panic that reached the caller would fail the test.
    let first = w.vm.admit(0).await;
    assert!(
        matches!(&first, Err(AdmitError::Stopped(m)) if m.contains("owner failed")),
        "the held request is answered: {first:?}"
    );
    assert_eq!(w.backend.calls(), ["start"]);
    *w.backend.start_panics.lock().unwrap() = false;
    let next = w.admit();
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "start"], "a new owner starts the VM again");
    assert_eq!(w.phase(), VmPhase::Starting);
    assert!(w.vm.gate().state().last_error.unwrap().contains("owner failed"));
    w.comes_up().await;
    drop(next.await.unwrap().expect("admitted by the new owner"));
}

/// A VM brought up by one event, whose backend's idle stop panics — in its owner's own
/// task — once its idle timeout has passed (the panic has just happened).
async fn a_vm_whose_idle_stop_panicked() -> World {
    let w = world(policy());
    drop(w.bring_up().await);
    *w.backend.stop_panics.lock().unwrap() = true;
    pass(IDLE + Duration::from_millis(100)).await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"]);
    w
}

/// The same for an owner that panics in its own task (here: the backend's idle stop):
/// the task ends, the VM was neither at rest nor removed, and the next request's owner
/// takes over from "failed" and starts it again (a no-op for a VM still running).
#[tokio::test(start_paused = true)]
async fn an_owner_that_panics_in_its_task_is_taken_over_by_the_next_request() {
    let w = a_vm_whose_idle_stop_panicked().await;
    *w.backend.stop_panics.lock().unwrap() = false;
    let next = w.admit();
    settle().await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle", "start"]);
    assert!(w.vm.gate().state().last_error.unwrap().contains("owner failed"));
    w.comes_up().await;
    drop(next.await.unwrap().expect("admitted by the new owner"));
}

/// And with no request to follow: a second after the panic a new owner takes over by
/// itself and starts the VM again (a no-op for a VM still running), so its idle timeout
/// stops it — it is not left running with no idle timer. Each further panic of the VM's
/// owners doubles the pause (a backend call that panics every time is retried as a
/// crash loop is).
#[tokio::test(start_paused = true)]
async fn an_owner_that_panics_in_its_task_is_taken_over_by_itself_and_its_vm_still_stops_once_idle() {
    let w = a_vm_whose_idle_stop_panicked().await;
    pass(Duration::from_millis(800)).await;
    assert_eq!(w.backend.calls(), ["start", "stop_if_idle"], "not before the pause");
    pass(Duration::from_millis(200)).await;
    assert_eq!(
        w.backend.calls(),
        ["start", "stop_if_idle", "start"],
        "taken over after 1 s"
    );
    assert!(w.vm.gate().state().last_error.unwrap().contains("owner failed"));
    w.comes_up().await;

    // The idle stop panics again: this time the pause is 2 s.
    pass(IDLE + Duration::from_millis(100)).await;
    let panicked_twice = ["start", "stop_if_idle", "start", "stop_if_idle"];
    assert_eq!(w.backend.calls(), panicked_twice);
    pass(Duration::from_millis(1500)).await;
    assert_eq!(w.backend.calls(), panicked_twice, "the pause doubled");
    pass(Duration::from_millis(500)).await;
    assert_eq!(
        w.backend.calls(),
        [&panicked_twice[..], &["start"]].concat(),
        "taken over after 2 s"
    );
    w.comes_up().await;

    // Mended: the owner that took over stops the VM once idle, with no request.
    *w.backend.stop_panics.lock().unwrap() = false;
    pass(IDLE + Duration::from_millis(100)).await;
    assert_eq!(w.backend.calls().last(), Some(&"stop_if_idle"));
    assert_eq!(w.phase(), VmPhase::Stopped);
}
