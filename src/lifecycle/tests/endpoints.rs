//! Several endpoints (the ready pods of a scaled workload): events spread over them,
//! one refusing connections is taken out while the others serve, the set follows the
//! backend, and losing every endpoint means probing again under the start timeout.

use super::*;

fn at(port: u16) -> Endpoint {
    Endpoint::from(([127, 0, 0, 1], port))
}

impl World {
    /// Brings the VM up on these endpoints (all answering) and returns its phase.
    async fn up_on(&self, endpoints: &[Endpoint]) {
        let first = self.admit();
        settle().await;
        self.backend.report_endpoints(BackendPhase::Running, endpoints.to_vec());
        self.probe.up.send_replace(true);
        settle().await;
        drop(first.await.unwrap().expect("admitted"));
    }

    fn targets(&self) -> Vec<Endpoint> {
        let mut endpoints: Vec<Endpoint> = self.vm.gate().state().targets.iter().map(|t| t.endpoint()).collect();
        endpoints.sort();
        endpoints
    }
}

#[tokio::test(start_paused = true)]
async fn held_and_warm_requests_are_spread_over_the_ready_endpoints() {
    let w = world(Policy {
        concurrency: 2,
        ..policy()
    });
    let held: Vec<_> = (0..4).map(|_| w.admit()).collect();
    settle().await;
    w.backend.report_endpoints(BackendPhase::Running, vec![at(1), at(2)]);
    w.probe.up.send_replace(true);
    settle().await;
    assert_eq!(w.phase(), VmPhase::Ready);
    assert_eq!(w.targets(), [at(1), at(2)]);
    let mut permits = Vec::new();
    for h in held {
        permits.push(h.await.unwrap().unwrap());
    }
    let on = |e: Endpoint| permits.iter().filter(|p| p.endpoint() == e).count();
    assert_eq!((on(at(1)), on(at(2))), (2, 2), "two each: concurrency is per endpoint");
    assert!(w.vm.gate().try_enter().is_none(), "both endpoints at their limit");
    drop(permits.pop());
    let warm = w.vm.gate().try_enter().expect("a slot freed");
    assert!(permits.iter().filter(|p| p.endpoint() == warm.endpoint()).count() == 1);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_refusing_connections_is_taken_out_and_the_others_keep_serving() {
    let w = world(policy());
    w.up_on(&[at(1), at(2)]).await;
    assert_eq!(w.targets(), [at(1), at(2)]);
    w.probe.down.send_replace(vec![at(1)]);
    w.vm.report_unreachable(at(1));
    settle().await;
    assert_eq!(w.phase(), VmPhase::Ready, "the other endpoint serves");
    assert_eq!(w.targets(), [at(2)]);
    for _ in 0..3 {
        assert_eq!(w.vm.gate().try_enter().unwrap().endpoint(), at(2));
    }
    w.probe.down.send_replace(vec![]);
    settle().await;
    assert_eq!(w.targets(), [at(1), at(2)], "back once its probe passes");
    assert_eq!(w.backend.calls(), ["start"]);
}

#[tokio::test(start_paused = true)]
async fn the_endpoints_follow_the_backend_and_new_ones_are_probed_first() {
    let w = world(policy());
    w.up_on(&[at(1)]).await;
    w.probe.down.send_replace(vec![at(2)]);
    w.backend.report_endpoints(BackendPhase::Running, vec![at(1), at(2)]);
    settle().await;
    assert_eq!(w.targets(), [at(1)], "not before its probe passes");
    w.probe.down.send_replace(vec![]);
    settle().await;
    assert_eq!(w.targets(), [at(1), at(2)]);
    w.backend.report_endpoints(BackendPhase::Running, vec![at(2)]);
    settle().await;
    assert_eq!(w.targets(), [at(2)], "gone from the backend, gone from the traffic");
    assert_eq!(w.phase(), VmPhase::Ready);
}

#[tokio::test(start_paused = true)]
async fn losing_every_endpoint_means_probing_and_the_start_timeout_then_a_stop() {
    let w = world(policy());
    w.up_on(&[at(1)]).await;
    w.backend.report_endpoints(BackendPhase::Running, vec![]);
    settle().await;
    assert_eq!(w.phase(), VmPhase::Probing);
    let held = w.admit();
    settle().await;
    assert!(!held.is_finished(), "held until an endpoint takes traffic");
    pass(START).await;
    assert_eq!(held.await.unwrap().unwrap_err(), AdmitError::StartTimeout(START));
    assert_eq!(w.phase(), VmPhase::Failed);
    assert_eq!(w.backend.calls(), ["start", "stop"]);
}
