//! The ingress: `POST /{namespace}/{vm}[/{rest}]` → validate the CloudEvent → ask the
//! VM to admit it (which starts the VM if needed) → forward to the guest → stream the
//! guest's answer back. With `server`, the only module that knows axum.
//!
//! Owns: routing, body limits, the order of checks (route, auth, VM, size, validity,
//! admit). Must not import `server` or any backend implementation; it changes no VM's
//! state itself (it asks the VM's handle).

pub mod cloudevent;
mod forward;
pub mod response;
mod service;

use forward::forward;
pub use service::{Ingress, IngressBody};

use std::borrow::Cow;
use std::sync::Arc;

use axum::response::IntoResponse;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use tokio::time::Instant;

use crate::activator::Activator;
use crate::auth::{authorize, Authenticator};
use crate::config::IngressConfig;
use crate::lifecycle::VmHandle;
use crate::proxy::Proxy;
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
fn refuse_method<B>(state: &IngressState, request: &Request<B>) -> Response<IngressBody> {
    let error = match Target::parse(request.uri().path()) {
        Err(IngressError::NoRoute(path)) => IngressError::NoRoute(path),
        _ => IngressError::MethodNotAllowed(request.method().to_string()),
    };
    state.activator.metrics().unknown_vm_request(error.status().as_u16());
    state.refuse(error)
}

/// The parts of an ingress path.
#[derive(Debug, PartialEq, Eq)]
struct Target<'a> {
    namespace: Cow<'a, str>,
    name: Cow<'a, str>,
    /// The rest of the path after `/{namespace}/{vm}`, still percent-encoded, no leading '/'.
    rest: &'a str,
}

/// One path segment, percent-decoded (borrowed when there is nothing to decode).
fn decode(segment: &str) -> Result<Cow<'_, str>, IngressError> {
    cloudevent::percent_decode(segment.as_bytes()).map_err(|e| IngressError::BadPath(format!("{segment:?}: {e}")))
}

impl<'a> Target<'a> {
    fn parse(path: &'a str) -> Result<Target<'a>, IngressError> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let mut parts = trimmed.splitn(3, '/');
        let (Some(ns), Some(name)) = (parts.next(), parts.next()) else {
            return Err(IngressError::NoRoute(path.to_string()));
        };
        if ns.is_empty() || name.is_empty() {
            return Err(IngressError::NoRoute(path.to_string()));
        }
        let rest = parts.next().unwrap_or("");
        for segment in rest.split('/') {
            let decoded = decode(segment)?;
            // Reject traversal even when hidden behind encoded slashes or backslashes:
            // the guest may decode them and leave the configured path prefix.
            if decoded.split(['/', '\\']).any(|part| part == "." || part == "..") {
                return Err(IngressError::BadPath(format!(
                    "segment {segment:?} would leave the VM's path prefix"
                )));
            }
        }
        Ok(Target {
            namespace: decode(ns)?,
            name: decode(name)?,
            rest,
        })
    }

    /// The guest request target: the VM's prefix joined to `rest` with exactly one '/',
    /// plus the query. The common case — the prefix alone — is parsed once per prefix
    /// and thread and then shared (no allocation); otherwise the joined path's buffer
    /// becomes the URI without a copy.
    fn guest_uri(&self, prefix: &str, query: Option<&str>) -> Result<http::Uri, IngressError> {
        thread_local! {
            static PREFIX: std::cell::RefCell<Option<(String, http::Uri)>> = const { std::cell::RefCell::new(None) };
        }
        let invalid = |e: http::uri::InvalidUri| IngressError::BadPath(format!("guest path: {e}"));
        if self.rest.is_empty() && query.is_none() {
            return PREFIX.with_borrow_mut(|cached| match cached {
                Some((text, uri)) if text == prefix => Ok(uri.clone()),
                _ => {
                    let uri = http::Uri::try_from(prefix).map_err(invalid)?;
                    *cached = Some((prefix.to_string(), uri.clone()));
                    Ok(uri)
                }
            });
        }
        let joined = self.guest_path(prefix, query).into_boxed_str();
        http::Uri::from_maybe_shared(Bytes::from(joined.into_boxed_bytes())).map_err(invalid)
    }

    /// The guest path: the VM's prefix joined to `rest` with exactly one '/', plus the query.
    fn guest_path(&self, prefix: &str, query: Option<&str>) -> String {
        let mut path = String::with_capacity(prefix.len() + self.rest.len() + 2);
        path.push_str(prefix);
        if !self.rest.is_empty() {
            if !path.ends_with('/') {
                path.push('/');
            }
            path.push_str(self.rest);
        }
        if let Some(query) = query {
            path.push('?');
            path.push_str(query);
        }
        path
    }
}

/// The ingress handler. One async fn (no wrapper future): its state is what every held
/// event keeps alive.
async fn deliver<B>(state: IngressState, request: Request<B>) -> Response<IngressBody>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<service::BoxError>,
{
    if request.method() != http::Method::POST {
        return refuse_method(&state, &request);
    }
    let arrived = Instant::now();
    let (parts, body) = request.into_parts();
    let uri = parts.uri.clone();
    let target = match Target::parse(uri.path()) {
        Ok(target) => target,
        Err(error) => {
            state.activator.metrics().unknown_vm_request(error.status().as_u16());
            return state.refuse(error);
        }
    };
    // Authenticate before looking the VM up: an unauthenticated caller learns nothing
    // about which VMs exist, and starts nothing.
    let caller = match state.auth.authenticate(&parts.headers).await {
        Ok(caller) => caller,
        Err(error) => {
            let error = IngressError::from(error);
            state.activator.metrics().unknown_vm_request(error.status().as_u16());
            return state.refuse(error);
        }
    };
    let Some(vm) = state.activator.vm(&target.namespace, &target.name) else {
        let key = crate::vm::VmKey::new(&*target.namespace, &*target.name);
        let backend = state.activator.backend();
        // Listed by the backend but not in the registry yet (a replica just started):
        // retryable, never a 404 for a VM that exists.
        let known = backend.catalog().borrow().contains_key(&key);
        let error = if backend.is_connected() && !known {
            IngressError::UnknownVm(key.to_string())
        } else {
            IngressError::BackendUnavailable(key.to_string())
        };
        state.activator.metrics().unknown_vm_request(error.status().as_u16());
        return state.refuse(error);
    };
    let policy = vm.gate().policy();
    let authorized = authorize(
        &caller,
        &state.config.auth.allowed_subjects,
        &policy.allowed_subjects,
        vm.key(),
    );
    let result = match (authorized, &policy.refused) {
        (Err(error), _) => Err(error.into()),
        // Refused names start nothing and hold nothing.
        (Ok(()), Some(reason)) => Err(IngressError::Refused(reason.clone())),
        (Ok(()), None) => handle(&state, &vm, &policy, &target, parts, body, arrived).await,
    };
    let metrics = vm.gate().metrics();
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            if let Some(reason) = error.reject_reason() {
                metrics.rejected(reason);
            }
            tracing::debug!(vm = %vm.key(), %error, "request refused");
            state.refuse(error)
        }
    };
    metrics.request(response.status().as_u16());
    metrics
        .series()
        .request_duration
        .observe(arrived.elapsed().as_secs_f64());
    response
}

async fn handle<B>(
    state: &IngressState,
    vm: &VmHandle,
    policy: &Policy,
    target: &Target<'_>,
    parts: http::request::Parts,
    body: B,
    arrived: Instant,
) -> Result<Response<IngressBody>, IngressError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<service::BoxError>,
{
    let body = read_body(&parts.headers, body, state.config.max_body_bytes).await?;
    let envelope = cloudevent::validate(&parts.headers, body)?;
    if let Some(kind) = envelope.event_type(&parts.headers) {
        if state.config.prewarm_types.iter().any(|t| t == kind) {
            // A pre-warm: start the VM, deliver nothing.
            let phase = vm.warm().await?;
            let body = serde_json::json!({"prewarm": true, "state": phase.as_str()});
            let response = (http::StatusCode::ACCEPTED, axum::Json(body)).into_response();
            return Ok(response.map(IngressBody::Own));
        }
    }
    let body_bytes = envelope.body.len();
    let permit = vm.admit_event(body_bytes, || envelope.trigger(&parts.headers)).await?;
    let guest_uri = target.guest_uri(&policy.path, parts.uri.query())?;
    let request = Proxy::prepare(guest_uri, parts, envelope.body);
    // Boxed: the forwarding future is large, and inline it would be part of every held
    // request's state (memory per held event), though only released requests need it.
    Box::pin(forward(state, vm, policy, request, permit, arrived, body_bytes)).await
}

/// Reads the body, refusing (413) as soon as it passes `limit` — from `Content-Length`
/// before reading anything, or while streaming a chunked body.
async fn read_body<B>(headers: &http::HeaderMap, body: B, limit: usize) -> Result<Bytes, IngressError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<service::BoxError>,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(IngressError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(IngressError::BodyTooLarge { limit }),
        Err(e) => Err(IngressError::BodyRead(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_joins_guest_paths() {
        let t = Target::parse("/default/demo").unwrap();
        assert_eq!((&*t.namespace, &*t.name, t.rest), ("default", "demo", ""));
        assert_eq!(t.guest_path("/", None), "/");
        assert_eq!(t.guest_path("/api", Some("a=1")), "/api?a=1");
        let t = Target::parse("/default/demo/orders/42").unwrap();
        assert_eq!(t.rest, "orders/42");
        assert_eq!(t.guest_path("/", None), "/orders/42");
        assert_eq!(t.guest_path("/api/", None), "/api/orders/42");
        assert_eq!(t.guest_path("/api", None), "/api/orders/42");
        assert_eq!(t.guest_uri("/api", Some("a=1")).unwrap(), "/api/orders/42?a=1");
        let bare = Target::parse("/default/demo").unwrap();
        for _ in 0..2 {
            assert_eq!(
                bare.guest_uri("/api", None).unwrap(),
                "/api",
                "parsed once, then shared"
            );
        }
        assert_eq!(bare.guest_uri("/", None).unwrap(), "/");
    }

    #[test]
    fn rejects_traversal_in_any_encoding() {
        for path in [
            "/default/demo/../admin",
            "/default/demo/a/./b",
            "/default/demo/%2e%2e/admin",
            "/default/demo/..%2Fadmin",
            "/default/demo/..%5Cadmin",
            "/default/demo/%zz",
        ] {
            assert!(matches!(Target::parse(path), Err(IngressError::BadPath(_))), "{path}");
        }
        assert!(matches!(Target::parse("/onlyone"), Err(IngressError::NoRoute(_))));
    }
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
        let future = deliver(state, Request::new(LikeIncoming::default()));
        let size = std::mem::size_of_val(&future);
        assert!(size <= 2048, "the ingress future is {size} bytes");
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
