//! Who may use the admin verbs (`POST /v1/vms/{ns}/{name}/start|stop|pause|hibernate`),
//! as `admin.verbs_auth` says: anyone (`none`: the default only for the local backend
//! with the admin listener on loopback), a token from a file (`bearer`), or the
//! Kubernetes API server (`kubernetes`: TokenReview, then SubjectAccessReview — see
//! `backend::kubevirt::access`). A refused caller gets 401 or 403 and nothing moves; a
//! review that cannot be made now gets 503.
//!
//! Owns: the verb guard. Must not import backend implementations.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::activator::Activator;
use crate::auth::bearer::BearerTokens;
use crate::auth::{bearer_token, AuthError};
use crate::backend::{Access, AdminVerb};
use crate::config::{Config, VerbAuthMode};
use crate::vm::VmKey;

/// The guard of the admin verbs.
#[derive(Clone)]
pub enum VerbGuard {
    /// Anyone who reaches the admin listener.
    Open,
    /// A token from the file.
    Tokens(Arc<BearerTokens>),
    /// The backend's API server reviews the token and the permission.
    Reviewed,
}

impl VerbGuard {
    /// The guard `config` asks for (validated already); bearer mode reads and watches
    /// the token file.
    pub async fn from_config(config: &Config) -> Result<VerbGuard, String> {
        match config.verbs_auth() {
            VerbAuthMode::None => Ok(VerbGuard::Open),
            VerbAuthMode::Bearer => {
                let path = config
                    .admin
                    .bearer_tokens_file
                    .clone()
                    .ok_or("admin.bearer_tokens_file is required")?;
                Ok(VerbGuard::Tokens(BearerTokens::watch(path).await?))
            }
            VerbAuthMode::Kubernetes => Ok(VerbGuard::Reviewed),
        }
    }

    /// Lets the caller do `verb` to `vm`, or says why not.
    pub async fn check(
        &self,
        headers: &HeaderMap,
        activator: &Activator,
        vm: &VmKey,
        verb: AdminVerb,
    ) -> Result<(), Refused> {
        let token = || bearer_token(headers).map_err(|e| Refused::unauthorized(e.to_string()));
        match self {
            VerbGuard::Open => Ok(()),
            VerbGuard::Tokens(tokens) => tokens.check(token()?).map_err(|e| match e {
                AuthError::Unavailable(detail) => Refused::unavailable(detail),
                other => Refused::unauthorized(other.to_string()),
            }),
            VerbGuard::Reviewed => match activator.backend().review_access(token()?, vm, verb).await {
                Ok(Access::Allowed { user }) => {
                    tracing::info!(vm = %vm, verb = verb.as_str(), %user, "admin verb allowed");
                    Ok(())
                }
                Ok(Access::Unauthenticated(why)) => Err(Refused::unauthorized(why)),
                Ok(Access::Forbidden { user, reason }) => {
                    tracing::info!(vm = %vm, verb = verb.as_str(), %user, %reason, "admin verb refused");
                    Err(Refused {
                        status: StatusCode::FORBIDDEN,
                        code: "forbidden",
                        detail: reason,
                    })
                }
                Err(error) => Err(Refused::unavailable(format!("cannot review the caller now: {error}"))),
            },
        }
    }
}

/// Why a caller may not use a verb; answered as `{"error", "detail"}` with its status.
#[derive(Debug)]
pub struct Refused {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl Refused {
    fn unauthorized(detail: String) -> Refused {
        Refused {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            detail,
        }
    }

    fn unavailable(detail: String) -> Refused {
        Refused {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "unavailable",
            detail,
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"error": self.code, "detail": self.detail}))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
