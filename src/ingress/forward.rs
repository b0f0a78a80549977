//! Delivering one admitted request to the guest: sent again, after a jittered backoff
//! and re-admission, while no connection can be made (nothing reached the guest), until
//! the request's budget is spent; a failure once it was sent is final.

use std::future::Future;
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::{IngressBody, IngressError, IngressState};
use crate::lifecycle::{Permit, VmHandle};
use crate::proxy::{ConnectError, Failure, GuardedBody, GuestRequest, ProxyError};
use crate::vm::Policy;

/// Sends the request to the guest until it got there or its budget is spent: a
/// connection that could not be made (refused, timed out, or closed before the request
/// was written — nothing reached the guest) is tried again, after a jittered backoff and
/// on whichever endpoint the VM admits it to then (a refusing endpoint is re-probed
/// meanwhile). The budget is `start_timeout` from arrival for a held event,
/// `request_timeout` for a warm one. A failure once the request was sent is final.
///
/// A plain fn returning a block, not an `async fn`: an async fn's future keeps its
/// arguments twice (the request, 256 bytes, among them), and every request allocates
/// this future.
#[allow(clippy::manual_async_fn)] // On purpose: see above.
pub(super) fn forward<'a>(
    state: &'a IngressState,
    vm: &'a VmHandle,
    policy: &'a Policy,
    request: GuestRequest,
    mut permit: Permit,
    arrived: Instant,
    body_bytes: usize,
) -> impl Future<Output = Result<Response<IngressBody>, IngressError>> + Send + 'a {
    async move {
        let budget_end = match permit.was_held() {
            true => arrived + policy.start_timeout,
            // From the request's arrival: a warm request was admitted microseconds later,
            // and the clock is not read again for it.
            false => arrived + policy.request_timeout,
        };
        let mut backoff = Backoff::default();
        let mut attempts = 0;
        loop {
            attempts += 1;
            if crate::telemetry::enabled() {
                tracing::Span::current().record("attempts", attempts as i64);
            }
            let endpoint = permit.endpoint();
            // The guest's answer is due `request_timeout` after it is sent: for a warm
            // request's first attempt, sent as it arrived, that is its budget's end (the
            // clock is not read again).
            let answer_by = match attempts == 1 && !permit.was_held() {
                true => budget_end,
                false => Instant::now() + policy.request_timeout,
            };
            // A `let`, not a `match` around the retry: a match's scrutinee (the send's
            // result, 248 bytes) would be kept across the retry's waits.
            let error = match state
                .proxy
                .send(endpoint, &request, budget_end, answer_by, policy.request_timeout)
                .await
            {
                Ok(response) => {
                    permit.answered();
                    tracing::debug!(vm = %vm.key(), status = response.status().as_u16(), attempts, "guest answered");
                    let (parts, body) = response.into_parts();
                    return Ok(Response::from_parts(
                        parts,
                        IngressBody::Guest(GuardedBody::new(body, permit)),
                    ));
                }
                Err(Failure::Failed(error)) => {
                    if matches!(error, ProxyError::Unreachable(_)) {
                        vm.report_unreachable(endpoint);
                    }
                    return Err(error.into());
                }
                Err(Failure::NotSent(error)) => error,
            };
            permit.not_connected();
            if matches!(error, ConnectError::Refused(_)) {
                // Nothing listens there: out of the traffic until a probe passes.
                vm.report_unreachable(endpoint);
            }
            drop(permit);
            let gave_up = || {
                IngressError::from(ProxyError::NotConnected {
                    attempts,
                    last: error.clone(),
                })
            };
            let pause = backoff.next();
            if Instant::now() + pause >= budget_end {
                return Err(gave_up());
            }
            tracing::debug!(vm = %vm.key(), %endpoint, %error, attempts, "not connected; trying again");
            vm.gate().metrics().connect_retry();
            tokio::time::sleep(pause).await;
            permit = match tokio::time::timeout_at(budget_end, vm.admit(body_bytes)).await {
                Ok(admitted) => admitted?,
                Err(_) => return Err(gave_up()),
            };
        }
    }
}

/// Pauses between connection attempts: from 5 ms doubling to 250 ms, each drawn at
/// random from its upper half, so requests that failed together do not retry together.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(5),
        }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(Duration::from_millis(250));
        ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
    }
}
