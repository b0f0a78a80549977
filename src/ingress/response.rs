//! The one place where errors become HTTP responses (the status table in
//! docs/http.md, "Error codes"): every refusal gets a status, a JSON body
//! `{"error", "detail"[, "attribute"]}`, and a `Retry-After` on 503 so Knative (and any
//! sender) retries.
//!
//! Each error maps to its (status, code, rejection reason) in one `match`
//! ([`IngressError::describe`]); a test walks every variant.
//!
//! Owns: status codes, error bodies, rejection reasons for metrics.
//! Must not import the backend or lifecycle internals beyond their error types.
//!
//! Long because: half of it is the table test that walks every variant (and checks
//! `CODES`, the list the handbook is held to).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::cloudevent::EventError;
use crate::auth::AuthError;
use crate::lifecycle::AdmitError;
use crate::metrics::RejectReason;
use crate::proxy::{ConnectError, ProxyError};

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
    /// The name is refused: e.g. several opted-in workloads of different kinds share it.
    #[error("{0}")]
    Refused(String),
    /// A path segment is `.`/`..` or otherwise unusable.
    #[error("invalid path: {0}")]
    BadPath(String),
    /// The body did not come within `ingress.body_read_timeout` of the head.
    #[error("the request body did not come within {0:?} (ingress.body_read_timeout)")]
    BodyTimeout(std::time::Duration),
    /// The body exceeded `ingress.max_body_bytes`.
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
    Admit(#[from] AdmitError),
    /// The guest did not answer.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The caller is not authenticated or not allowed.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Every code an ingress refusal's JSON body can carry in `error` (the table test below
/// checks this list against `describe`; the handbook names each, tests/docs.rs).
pub const CODES: &[&str] = &[
    "no_route",
    "method_not_allowed",
    "unknown_vm",
    "backend_unavailable",
    "conflict",
    "bad_path",
    "body_too_large",
    "body_timeout",
    "body_unreadable",
    "invalid_event",
    "buffer_full",
    "start_failed",
    "start_timeout",
    "vm_stopped",
    "draining",
    "guest_timeout",
    "guest_unreachable",
    "guest_response_too_large",
    "guest_not_connected",
    "unauthenticated",
    "invalid_token",
    "forbidden",
    "auth_unavailable",
];

impl IngressError {
    /// The HTTP status, the machine-readable code of the JSON body, and the
    /// `rejected_total` reason (for refusals that never reached the guest) — together,
    /// so they cannot drift apart.
    pub fn describe(&self) -> (StatusCode, &'static str, Option<RejectReason>) {
        use IngressError as E;
        use RejectReason as R;
        use StatusCode as S;
        match self {
            E::NoRoute(_) => (S::NOT_FOUND, "no_route", None),
            E::MethodNotAllowed(_) => (S::METHOD_NOT_ALLOWED, "method_not_allowed", None),
            E::UnknownVm(_) => (S::NOT_FOUND, "unknown_vm", None),
            E::BackendUnavailable(_) => (S::SERVICE_UNAVAILABLE, "backend_unavailable", None),
            E::Refused(_) => (S::CONFLICT, "conflict", Some(R::Conflict)),
            E::BadPath(_) => (S::BAD_REQUEST, "bad_path", Some(R::InvalidEvent)),
            E::BodyTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "body_too_large", Some(R::BodyTooLarge)),
            E::BodyTimeout(_) => (S::REQUEST_TIMEOUT, "body_timeout", Some(R::BodyTimeout)),
            E::BodyRead(_) => (S::BAD_REQUEST, "body_unreadable", Some(R::InvalidEvent)),
            E::InvalidEvent(_) => (S::BAD_REQUEST, "invalid_event", Some(R::InvalidEvent)),
            E::Admit(AdmitError::BufferFull { .. }) => (S::SERVICE_UNAVAILABLE, "buffer_full", Some(R::BufferFull)),
            E::Admit(AdmitError::StartFailed(_)) => (S::SERVICE_UNAVAILABLE, "start_failed", Some(R::StartFailed)),
            E::Admit(AdmitError::StartTimeout(_)) => (S::SERVICE_UNAVAILABLE, "start_timeout", Some(R::StartTimeout)),
            E::Admit(AdmitError::Stopped(_)) => (S::SERVICE_UNAVAILABLE, "vm_stopped", Some(R::StartFailed)),
            E::Admit(AdmitError::Draining) => (S::SERVICE_UNAVAILABLE, "draining", Some(R::Draining)),
            E::Admit(AdmitError::BackendUnavailable) => (
                S::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                Some(R::BackendUnavailable),
            ),
            E::Proxy(ProxyError::Timeout(_)) => (S::GATEWAY_TIMEOUT, "guest_timeout", None),
            E::Proxy(ProxyError::Unreachable(_)) => (S::BAD_GATEWAY, "guest_unreachable", None),
            E::Proxy(ProxyError::ResponseTooLarge { .. }) => (S::BAD_GATEWAY, "guest_response_too_large", None),
            E::Proxy(ProxyError::NotConnected {
                last: ConnectError::Timeout(_),
                ..
            }) => (S::GATEWAY_TIMEOUT, "guest_not_connected", None),
            E::Proxy(ProxyError::NotConnected {
                last: ConnectError::Refused(_),
                ..
            }) => (S::BAD_GATEWAY, "guest_not_connected", None),
            E::Auth(AuthError::Missing) => (S::UNAUTHORIZED, "unauthenticated", Some(R::Unauthorized)),
            E::Auth(AuthError::Invalid(_)) => (S::UNAUTHORIZED, "invalid_token", Some(R::Unauthorized)),
            E::Auth(AuthError::Forbidden { .. }) => (S::FORBIDDEN, "forbidden", Some(R::Unauthorized)),
            E::Auth(AuthError::Unavailable(_)) => (S::SERVICE_UNAVAILABLE, "auth_unavailable", None),
        }
    }

    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        self.describe().0
    }

    /// A short machine-readable code for the JSON body.
    pub fn code(&self) -> &'static str {
        self.describe().1
    }

    /// The `rejected_total` reason, for refusals that never reached the guest.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        self.describe().2
    }

    /// The full response. `retry_after_seconds` goes on every 503.
    pub fn into_response_with(self, retry_after_seconds: u32) -> Response {
        let (status, code, _) = self.describe();
        let mut body = json!({
            "error": code,
            "detail": self.to_string(),
        });
        if let IngressError::InvalidEvent(e) = &self {
            if let Some(attribute) = e.attribute() {
                body["attribute"] = json!(attribute);
            }
        }
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_seconds));
            }
            StatusCode::METHOD_NOT_ALLOWED => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            StatusCode::UNAUTHORIZED => {
                // RFC 6750 §3: say which scheme, and whether a token was presented but bad.
                let challenge = if code == "invalid_token" {
                    "Bearer error=\"invalid_token\""
                } else {
                    "Bearer"
                };
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The variant's name; exhaustive, so a new variant does not compile until the
    /// table below covers it.
    fn variant(error: &IngressError) -> &'static str {
        use IngressError as E;
        match error {
            E::NoRoute(_) => "NoRoute",
            E::MethodNotAllowed(_) => "MethodNotAllowed",
            E::UnknownVm(_) => "UnknownVm",
            E::BackendUnavailable(_) => "BackendUnavailable",
            E::Refused(_) => "Refused",
            E::BadPath(_) => "BadPath",
            E::BodyTooLarge { .. } => "BodyTooLarge",
            E::BodyTimeout(_) => "BodyTimeout",
            E::BodyRead(_) => "BodyRead",
            E::InvalidEvent(_) => "InvalidEvent",
            E::Admit(AdmitError::BufferFull { .. }) => "Admit(BufferFull)",
            E::Admit(AdmitError::StartFailed(_)) => "Admit(StartFailed)",
            E::Admit(AdmitError::StartTimeout(_)) => "Admit(StartTimeout)",
            E::Admit(AdmitError::Stopped(_)) => "Admit(Stopped)",
            E::Admit(AdmitError::Draining) => "Admit(Draining)",
            E::Admit(AdmitError::BackendUnavailable) => "Admit(BackendUnavailable)",
            E::Proxy(ProxyError::Timeout(_)) => "Proxy(Timeout)",
            E::Proxy(ProxyError::Unreachable(_)) => "Proxy(Unreachable)",
            E::Proxy(ProxyError::ResponseTooLarge { .. }) => "Proxy(ResponseTooLarge)",
            E::Proxy(ProxyError::NotConnected {
                last: ConnectError::Timeout(_),
                ..
            }) => "Proxy(NotConnected(Timeout))",
            E::Proxy(ProxyError::NotConnected {
                last: ConnectError::Refused(_),
                ..
            }) => "Proxy(NotConnected(Refused))",
            E::Auth(AuthError::Missing) => "Auth(Missing)",
            E::Auth(AuthError::Invalid(_)) => "Auth(Invalid)",
            E::Auth(AuthError::Forbidden { .. }) => "Auth(Forbidden)",
            E::Auth(AuthError::Unavailable(_)) => "Auth(Unavailable)",
        }
    }

    #[test]
    fn every_error_has_its_status_code_and_reason() {
        use RejectReason as R;
        let cases: Vec<(IngressError, u16, &str, Option<RejectReason>)> = vec![
            (IngressError::NoRoute("/".into()), 404, "no_route", None),
            (
                IngressError::MethodNotAllowed("GET".into()),
                405,
                "method_not_allowed",
                None,
            ),
            (IngressError::UnknownVm("a/b".into()), 404, "unknown_vm", None),
            (
                IngressError::BackendUnavailable("a/b".into()),
                503,
                "backend_unavailable",
                None,
            ),
            (
                IngressError::Refused("two opted in".into()),
                409,
                "conflict",
                Some(R::Conflict),
            ),
            (
                IngressError::BadPath("..".into()),
                400,
                "bad_path",
                Some(R::InvalidEvent),
            ),
            (
                IngressError::BodyTimeout(std::time::Duration::from_secs(1)),
                408,
                "body_timeout",
                Some(R::BodyTimeout),
            ),
            (
                IngressError::BodyTooLarge { limit: 1 },
                413,
                "body_too_large",
                Some(R::BodyTooLarge),
            ),
            (
                IngressError::BodyRead("reset".into()),
                400,
                "body_unreadable",
                Some(R::InvalidEvent),
            ),
            (
                EventError::NotAnEvent.into(),
                400,
                "invalid_event",
                Some(R::InvalidEvent),
            ),
            (
                AdmitError::BufferFull {
                    count: 1,
                    bytes: 1,
                    max_count: 1,
                    max_bytes: 1,
                }
                .into(),
                503,
                "buffer_full",
                Some(R::BufferFull),
            ),
            (
                AdmitError::StartFailed("x".into()).into(),
                503,
                "start_failed",
                Some(R::StartFailed),
            ),
            (
                AdmitError::StartTimeout(Duration::from_secs(1)).into(),
                503,
                "start_timeout",
                Some(R::StartTimeout),
            ),
            (
                AdmitError::Stopped("crashed".into()).into(),
                503,
                "vm_stopped",
                Some(R::StartFailed),
            ),
            (AdmitError::Draining.into(), 503, "draining", Some(R::Draining)),
            (
                AdmitError::BackendUnavailable.into(),
                503,
                "backend_unavailable",
                Some(R::BackendUnavailable),
            ),
            (
                ProxyError::Timeout(Duration::from_secs(1)).into(),
                504,
                "guest_timeout",
                None,
            ),
            (
                ProxyError::Unreachable("reset".into()).into(),
                502,
                "guest_unreachable",
                None,
            ),
            (
                ProxyError::ResponseTooLarge { declared: 2, limit: 1 }.into(),
                502,
                "guest_response_too_large",
                None,
            ),
            (
                ProxyError::NotConnected {
                    attempts: 9,
                    last: ConnectError::Timeout(Duration::from_secs(2)),
                }
                .into(),
                504,
                "guest_not_connected",
                None,
            ),
            (
                ProxyError::NotConnected {
                    attempts: 9,
                    last: ConnectError::Refused("refused".into()),
                }
                .into(),
                502,
                "guest_not_connected",
                None,
            ),
            (AuthError::Missing.into(), 401, "unauthenticated", Some(R::Unauthorized)),
            (
                AuthError::Invalid("expired".into()).into(),
                401,
                "invalid_token",
                Some(R::Unauthorized),
            ),
            (
                AuthError::Forbidden {
                    subject: "x".into(),
                    target: "a/b".into(),
                }
                .into(),
                403,
                "forbidden",
                Some(R::Unauthorized),
            ),
            (
                AuthError::Unavailable("jwks down".into()).into(),
                503,
                "auth_unavailable",
                None,
            ),
        ];
        let mut seen = std::collections::BTreeSet::new();
        let mut codes = std::collections::BTreeSet::new();
        for (error, code, name, reason) in cases {
            assert!(seen.insert(variant(&error)), "{} listed twice", variant(&error));
            codes.insert(name);
            let detail = error.to_string();
            assert_eq!(error.reject_reason(), reason, "{detail}");
            assert_eq!(error.code(), name, "{detail}");
            let response = error.into_response_with(7);
            assert_eq!(response.status().as_u16(), code, "{detail}");
            let retry = response.headers().get(header::RETRY_AFTER);
            assert_eq!(
                retry.map(|v| v.to_str().unwrap()),
                (code == 503).then_some("7"),
                "{detail}"
            );
            assert_eq!(
                response.headers().contains_key(header::WWW_AUTHENTICATE),
                code == 401,
                "{detail}"
            );
            assert_eq!(response.headers().contains_key(header::ALLOW), code == 405, "{detail}");
        }
        assert_eq!(seen.len(), 25, "every variant of IngressError is in the table");
        assert_eq!(
            codes,
            CODES.iter().copied().collect(),
            "CODES lists exactly the codes `describe` gives"
        );
    }
}
