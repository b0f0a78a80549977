//! The one place where errors become HTTP responses (DESIGN §2's status table):
//! every refusal gets a status, a JSON body `{"error", "detail"[, "attribute"]}`, and a
//! `Retry-After` on 503 so Knative (and any sender) retries.
//!
//! Owns: status codes, error bodies, rejection reasons for metrics.
//! Must not import the backend or gate internals beyond their error types.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::cloudevent::EventError;
use crate::activator::ActivateError;
use crate::auth::AuthError;
use crate::gate::GateError;
use crate::metrics::RejectReason;
use crate::proxy::ProxyError;

/// Everything the ingress can refuse a request for.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The path is not `/{namespace}/{vm}[/{rest}]`.
    #[error("no route for {0}; events go to POST /{{namespace}}/{{vm}}")]
    NoRoute(String),
    /// Only POST delivers events.
    #[error("method {0} is not allowed; events are delivered with POST")]
    MethodNotAllowed(String),
    /// No such VM, or not opted in.
    #[error("no VM {0} is managed by this activator")]
    UnknownVm(String),
    /// The VM is not in the catalog, but the catalog cannot be trusted: the backend has
    /// not synced (e.g. the Kubernetes API is unreachable), so "unknown" may be wrong.
    #[error("cannot tell whether VM {0} exists: the backend is not connected; retry")]
    BackendUnavailable(String),
    /// A path segment is `.`/`..` or otherwise unusable.
    #[error("invalid path: {0}")]
    BadPath(String),
    /// The body exceeded the limit.
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body could not be read.
    #[error("request body could not be read: {0}")]
    BodyRead(String),
    /// Not a valid CloudEvent.
    #[error(transparent)]
    InvalidEvent(#[from] EventError),
    /// The VM could not take the request.
    #[error(transparent)]
    Activate(#[from] ActivateError),
    /// The guest did not answer.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The caller is not authenticated or not allowed.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl IngressError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            IngressError::NoRoute(_) | IngressError::UnknownVm(_) => StatusCode::NOT_FOUND,
            IngressError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            IngressError::BadPath(_) | IngressError::BodyRead(_) | IngressError::InvalidEvent(_) => {
                StatusCode::BAD_REQUEST
            }
            IngressError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngressError::Activate(_) | IngressError::BackendUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngressError::Proxy(ProxyError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            IngressError::Proxy(_) => StatusCode::BAD_GATEWAY,
            IngressError::Auth(AuthError::Missing | AuthError::Invalid(_)) => StatusCode::UNAUTHORIZED,
            IngressError::Auth(AuthError::Forbidden { .. }) => StatusCode::FORBIDDEN,
            IngressError::Auth(AuthError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A short machine-readable code for the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            IngressError::NoRoute(_) => "no_route",
            IngressError::MethodNotAllowed(_) => "method_not_allowed",
            IngressError::UnknownVm(_) => "unknown_vm",
            IngressError::BackendUnavailable(_) => "backend_unavailable",
            IngressError::BadPath(_) => "bad_path",
            IngressError::BodyTooLarge { .. } => "body_too_large",
            IngressError::BodyRead(_) => "body_unreadable",
            IngressError::InvalidEvent(_) => "invalid_event",
            IngressError::Activate(ActivateError::Draining) => "draining",
            IngressError::Activate(ActivateError::Gate(e)) => match e {
                GateError::BufferFull { .. } => "buffer_full",
                GateError::StartFailed(_) => "start_failed",
                GateError::StartTimeout(_) => "start_timeout",
                GateError::Stopped(_) => "vm_stopped",
                GateError::ShuttingDown => "draining",
            },
            IngressError::Proxy(ProxyError::Timeout(_)) => "guest_timeout",
            IngressError::Proxy(_) => "guest_unreachable",
            IngressError::Auth(AuthError::Missing) => "unauthenticated",
            IngressError::Auth(AuthError::Invalid(_)) => "invalid_token",
            IngressError::Auth(AuthError::Forbidden { .. }) => "forbidden",
            IngressError::Auth(AuthError::Unavailable(_)) => "auth_unavailable",
        }
    }

    /// The `rejected_total` reason, for refusals that never reached the guest.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            IngressError::BodyTooLarge { .. } => Some(RejectReason::BodyTooLarge),
            IngressError::InvalidEvent(_) | IngressError::BodyRead(_) | IngressError::BadPath(_) => {
                Some(RejectReason::InvalidEvent)
            }
            IngressError::Activate(ActivateError::Draining) => Some(RejectReason::Draining),
            IngressError::Auth(AuthError::Missing | AuthError::Invalid(_) | AuthError::Forbidden { .. }) => {
                Some(RejectReason::Unauthorized)
            }
            IngressError::Activate(ActivateError::Gate(e)) => Some(match e {
                GateError::BufferFull { .. } => RejectReason::BufferFull,
                GateError::StartFailed(_) | GateError::Stopped(_) => RejectReason::StartFailed,
                GateError::StartTimeout(_) => RejectReason::StartTimeout,
                GateError::ShuttingDown => RejectReason::Draining,
            }),
            _ => None,
        }
    }

    /// The full response. `retry_after_seconds` goes on every 503.
    pub fn into_response_with(self, retry_after_seconds: u32) -> Response {
        let status = self.status();
        let mut body = json!({
            "error": self.code(),
            "detail": self.to_string(),
        });
        if let IngressError::InvalidEvent(e) = &self {
            if let Some(attribute) = e.attribute() {
                body["attribute"] = json!(attribute);
            }
        }
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: say which scheme, and whether a token was presented but bad.
            let challenge = if self.code() == "invalid_token" {
                "Bearer error=\"invalid_token\""
            } else {
                "Bearer"
            };
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn status_table() {
        let gate = |e| IngressError::Activate(ActivateError::Gate(e));
        let cases: Vec<(IngressError, u16)> = vec![
            (IngressError::UnknownVm("a/b".into()), 404),
            (IngressError::NoRoute("/".into()), 404),
            (IngressError::MethodNotAllowed("GET".into()), 405),
            (IngressError::BodyTooLarge { limit: 1 }, 413),
            (EventError::NotAnEvent.into(), 400),
            (gate(GateError::StartTimeout(Duration::from_secs(1))), 503),
            (gate(GateError::StartFailed("x".into())), 503),
            (IngressError::Activate(ActivateError::Draining), 503),
            (IngressError::BackendUnavailable("a/b".into()), 503),
            (ProxyError::Timeout(Duration::from_secs(1)).into(), 504),
            (ProxyError::Unreachable("reset".into()).into(), 502),
            (AuthError::Missing.into(), 401),
            (AuthError::Invalid("expired".into()).into(), 401),
            (
                AuthError::Forbidden {
                    subject: "x".into(),
                    target: "a/b".into(),
                }
                .into(),
                403,
            ),
            (AuthError::Unavailable("jwks down".into()).into(), 503),
        ];
        for (error, code) in cases {
            let name = error.to_string();
            let response = error.into_response_with(7);
            assert_eq!(response.status().as_u16(), code, "{name}");
            let retry = response.headers().get(header::RETRY_AFTER);
            assert_eq!(retry.is_some(), code == 503, "{name}");
            assert_eq!(
                response.headers().contains_key(header::WWW_AUTHENTICATE),
                code == 401,
                "{name}"
            );
        }
    }
}
