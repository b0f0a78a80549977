//! The ingress: `POST /{namespace}/{vm}[/{rest}]` → validate the CloudEvent → ask the
//! VM to admit it (which starts the VM if needed) → forward to the guest → stream the
//! guest's answer back. With `server`, the only module that knows axum.
//!
//! Owns: routing, body limits, the order of checks (route, auth, VM, size, validity,
//! admit). Must not import `server` or any backend implementation; it changes no VM's
//! state itself (it asks the VM's handle).

mod body;
pub mod cloudevent;
mod forward;
mod packed;
pub mod response;
mod service;
mod target;

use body::read_body;
use forward::forward;
pub use service::{Ingress, IngressBody};
use target::{Rest, Target};

use std::future::Future;
use std::sync::Arc;

use axum::response::IntoResponse;
use bytes::Bytes;
use http::Response;

use tokio::time::Instant;
use tracing::{Instrument, Span};

use crate::activator::Activator;
use crate::auth::{authorize, Authenticator};
use crate::config::IngressConfig;
use crate::http1::lines::Fields;
use crate::lifecycle::{Permit, VmHandle};
use crate::proxy::Proxy;
use crate::telemetry;
use crate::vm::Policy;
use response::IngressError;

/// What the ingress handlers share. One `Arc`: axum clones the state for every request.
#[derive(Clone)]
pub struct IngressState(Arc<Shared>);

/// The contents of `IngressState`.
pub struct Shared {
    activator: Arc<Activator>,
    proxy: Proxy,
    config: IngressConfig,
    auth: Authenticator,
}

impl std::ops::Deref for IngressState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl IngressState {
    /// State over an activator and a proxy, with the ingress limits and authenticator.
    pub fn new(activator: Arc<Activator>, proxy: Proxy, config: IngressConfig, auth: Authenticator) -> Self {
        Self(Arc::new(Shared {
            activator,
            proxy,
            config,
            auth,
        }))
    }

    fn refuse(&self, error: IngressError) -> Response<IngressBody> {
        error
            .into_response_with(self.config.retry_after_seconds)
            .map(IngressBody::Own)
    }
}

/// The ingress: `POST /{namespace}/{vm}` and `POST /{namespace}/{vm}/{*rest}`; anything
/// else is a JSON 404 (or 405 for another method on those paths). At most
/// `max_concurrent` requests at once.
pub fn service(state: IngressState, max_concurrent: usize) -> Ingress {
    Ingress::new(state, max_concurrent)
}

/// Anything but POST: 405 on a VM's path, 404 elsewhere.
pub(super) fn refuse_method(state: &IngressState, method: &http::Method, uri: &http::Uri) -> Response<IngressBody> {
    let error = match Target::parse(uri.path()) {
        Err(IngressError::NoRoute(path)) => IngressError::NoRoute(path),
        _ => IngressError::MethodNotAllowed(method.to_string()),
    };
    state.activator.metrics().unknown_vm_request(error.status().as_u16());
    state.refuse(error)
}

/// The ingress handler. It borrows the request's head and body from its caller's future
/// and moves neither. A held event keeps its whole future, and a future keeps a slot for
/// everything it captures or takes by value even once moved on, and for every local it
/// ever borrowed until that local's scope ends: by value the head was kept four times
/// over (the held state was 2.4 KB; 0.7 KB now — `held_state` below checks it).
async fn deliver<B>(
    state: &IngressState,
    path: Option<&http::uri::PathAndQuery>,
    headers: &mut Fields,
    body: &mut B,
) -> Response<IngressBody>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<service::BoxError>,
{
    let arrived = Instant::now();
    // A block: of the path only its rest, and nothing of the caller, is kept while the
    // event is.
    let (vm, policy, refusal, rest) = {
        let target = match Target::parse(path.map_or("/", http::uri::PathAndQuery::path)) {
            Ok(target) => target,
            Err(error) => {
                state.activator.metrics().unknown_vm_request(error.status().as_u16());
                return state.refuse(error);
            }
        };
        // Authenticate before looking the VM up: an unauthenticated caller learns nothing
        // about which VMs exist, and starts nothing.
        let caller = match state.auth.authenticate(&*headers).await {
            Ok(caller) => caller,
            Err(error) => {
                let error = IngressError::from(error);
                state.activator.metrics().unknown_vm_request(error.status().as_u16());
                return state.refuse(error);
            }
        };
        if telemetry::enabled() {
            telemetry::event::target(&Span::current(), &target.namespace, &target.name);
        }
        let Some(vm) = state.activator.vm_or_sync(&target.namespace, &target.name) else {
            return refuse_unknown(state, &target);
        };
        let policy = vm.gate().policy();
        let refusal = match authorize(
            &caller,
            &state.config.auth.allowed_subjects,
            &policy.allowed_subjects,
            vm.key(),
        ) {
            Err(error) => Some(Box::new(IngressError::from(error))),
            // Refused names start nothing and hold nothing.
            Ok(()) => policy
                .refused
                .clone()
                .map(|reason| Box::new(IngressError::Refused(reason))),
        };
        (vm, policy, refusal, target.rest())
    };
    let result = match refusal {
        Some(error) => Err(*error),
        None => {
            handle(Exchange {
                state,
                vm: &vm,
                policy: &policy,
                rest,
                query: path.and_then(http::uri::PathAndQuery::query),
                headers,
                body,
                arrived,
            })
            .await
        }
    };
    let metrics = vm.gate().metrics();
    // What the trace says happened, when the activator answered itself.
    let mut result_outcome = None;
    let response = match result {
        Ok(response) => {
            if matches!(response.body(), IngressBody::Own(_)) {
                result_outcome = Some("prewarm");
            }
            response
        }
        Err(error) => {
            result_outcome = Some(error.code());
            if let Some(reason) = error.reject_reason() {
                metrics.rejected(reason);
                vm.gate().log_rejection(reason, error.status().as_u16());
            }
            tracing::debug!(vm = %vm.key(), %error, "request refused");
            state.refuse(error)
        }
    };
    if telemetry::enabled() {
        let outcome = match (&result_outcome, response.status().is_success()) {
            (Some(code), _) => code,
            (None, true) => "delivered",
            (None, false) => "guest_error",
        };
        telemetry::event::outcome(&Span::current(), response.status().as_u16(), outcome);
    }
    metrics.request(response.status().as_u16());
    metrics
        .series()
        .request_duration
        .observe(arrived.elapsed().as_secs_f64());
    response
}

/// No VM by that name here: 404, or 503 while the backend cannot say.
fn refuse_unknown(state: &IngressState, target: &Target<'_>) -> Response<IngressBody> {
    let key = crate::vm::VmKey::new(&*target.namespace, &*target.name);
    let backend = state.activator.backend();
    // Listed by the backend only once the lookup looked (a replica just started):
    // retryable, never a 404 for a VM that exists.
    let known = backend.catalog().borrow().contains_key(&key);
    let error = if backend.is_connected() && !known {
        IngressError::UnknownVm(key.to_string())
    } else {
        IngressError::BackendUnavailable(key.to_string())
    };
    state.activator.metrics().unknown_vm_request(error.status().as_u16());
    state.refuse(error)
}

/// One request to a known VM, borrowed from the caller's future: what `handle` needs.
struct Exchange<'a, B> {
    state: &'a IngressState,
    vm: &'a VmHandle,
    policy: &'a Policy,
    rest: Rest<'a>,
    query: Option<&'a str>,
    headers: &'a mut Fields,
    body: &'a mut B,
    arrived: Instant,
}

/// Reads and validates the event, lets the VM admit it (holding it while the VM starts)
/// and forwards it. A plain fn returning a block, not an `async fn`: an async fn's
/// future keeps its arguments twice (as passed, and as its locals).
#[allow(clippy::manual_async_fn)] // On purpose: see above.
fn handle<'a, B>(mut x: Exchange<'a, B>) -> impl Future<Output = Result<Response<IngressBody>, IngressError>> + 'a
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<service::BoxError>,
{
    async move {
        let config = &x.state.config;
        let body = read_body(x.body, config.max_body_bytes, config.body_read_timeout).await?;
        let envelope = cloudevent::validate(&*x.headers, body)?;
        // The type is looked up only when some type is a pre-warm (most configurations
        // have none).
        if !config.prewarm_types.is_empty()
            && envelope
                .event_type(&*x.headers)
                .is_some_and(|kind| config.prewarm_types.iter().any(|t| t == kind))
        {
            // A pre-warm: start the VM, deliver nothing.
            let phase = x.vm.warm().await?;
            let body = serde_json::json!({"prewarm": true, "state": phase.as_str()});
            let response = (http::StatusCode::ACCEPTED, axum::Json(body)).into_response();
            return Ok(response.map(IngressBody::Own));
        }
        if telemetry::enabled() {
            trace_cloudevent(&envelope, x.headers);
        }
        // A labelled block, not a `match` on `try_admit`: a match keeps its scrutinee
        // (the permit it did not give) for as long as the event is held.
        let permit = 'admitted: {
            if let Some(permit) = x.vm.try_admit()? {
                break 'admitted permit;
            }
            // Held: its headers packed meanwhile (see `packed`).
            let packed = packed::PackedHeaders::pack(x.headers);
            let trigger = || {
                let mut trigger = envelope.trigger_from(|name| packed.get(name));
                if telemetry::enabled() {
                    trigger.trace_id = Some(telemetry::event::trace_id(&Span::current()));
                }
                trigger
            };
            let permit = x.vm.hold(envelope.body.len(), trigger).await;
            *x.headers = packed.unpack();
            permit?
        };
        let guest_uri = x.rest.guest_uri(&x.policy.path, x.query)?;
        forwarding(&mut x, permit, guest_uri, envelope.body).await
    }
}

/// The forwarding of an admitted request, boxed: it is large, and inline it would be
/// part of every held request's state, though only released requests need it. A plain
/// fn: what it builds on the way is not kept by the caller's future either.
fn forwarding<'a, B>(
    x: &mut Exchange<'a, B>,
    permit: Permit,
    guest_uri: http::Uri,
    body: Bytes,
) -> impl Future<Output = Result<Response<IngressBody>, IngressError>> + 'a {
    // Before the headers are taken: the guest gets the `forward` span's `traceparent`.
    let traced = telemetry::enabled().then(|| trace_admitted(&permit, x.headers));
    // The guest gets the sender's header fields (taken: nothing else needs them now).
    let headers = std::mem::take(x.headers);
    let body_bytes = body.len();
    let request = Proxy::prepare(http::Method::POST, guest_uri, headers, body);
    let (state, vm, policy, arrived) = (x.state, x.vm, x.policy, x.arrived);
    let forward = forward(state, vm, policy, request, permit, arrived, body_bytes);
    // Instrumented only when traced (see `Ingress::answer`).
    match traced {
        Some(span) => Box::pin(futures_util::future::Either::Left(forward.instrument(span))),
        None => Box::pin(futures_util::future::Either::Right(forward)),
    }
}

/// Puts the CloudEvent's attributes on the request's span. Not inline in `handle`: its
/// locals would be part of every held request's state.
fn trace_cloudevent(envelope: &cloudevent::Envelope, headers: &Fields) {
    let trigger = envelope.trigger(headers);
    let event_type = envelope.event_type(headers);
    telemetry::event::cloudevent(&Span::current(), event_type, &trigger.id, &trigger.source);
}

/// Traces a request that was let in: its `held` span (with the cold start it waited
/// for), and the `forward` span whose context the guest gets as its `traceparent`.
fn trace_admitted(permit: &Permit, headers: &mut Fields) -> Span {
    let span = Span::current();
    match permit.held() {
        Some(held) => {
            let phases = held.cold.iter().flat_map(|cold| cold.phases.iter());
            telemetry::event::held(&span, held.since, phases.map(|p| (p.name, p.from, p.to)));
        }
        None => telemetry::event::went_in(&span),
    }
    telemetry::event::forward(&span, headers.map_mut())
}

#[cfg(test)]
mod held_state {
    use super::*;
    use crate::backend::fake::{FakeBackend, FakeOptions};
    use crate::config::Config;

    /// A held event keeps its whole request future alive until the VM is ready: large
    /// rarely-used futures (the OIDC verifier, the proxy call) are boxed so they are not
    /// part of it. Regressions here multiply by `max_buffered`.
    #[tokio::test]
    async fn the_request_future_stays_small() {
        let backend = FakeBackend::new([], FakeOptions::default());
        let app = crate::server::app(&Config::for_tests(), backend).await.unwrap();
        let auth = Authenticator::from_config(&Default::default()).await.unwrap();
        let state = IngressState::new(app.activator, Proxy::new(&Default::default()), Default::default(), auth);
        // The listener's request body is hyper's `Incoming`, which a test cannot make:
        // a body of the same size stands in for it.
        let future = service(state, 1).answer(
            http::Method::POST,
            http::Uri::default(),
            Fields::default(),
            LikeIncoming::default(),
        );
        let size = std::mem::size_of_val(&future);
        eprintln!("ingress future: {size} bytes");
        assert!(size <= 736, "the ingress future is {size} bytes");
    }

    const INCOMING_WORDS: usize = std::mem::size_of::<hyper::body::Incoming>().div_ceil(8);

    #[derive(Default)]
    struct LikeIncoming {
        _size: [u64; INCOMING_WORDS],
    }

    impl http_body::Body for LikeIncoming {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }
    }
}
