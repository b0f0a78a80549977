//! TokenReview and SubjectAccessReview, as kube-apiserver answers them, over tokens and
//! grants the test scripts (`FakeKube::add_token`, `FakeKube::grant`): an unknown token
//! is not authenticated; a user may do what a grant names (verb, group, resource,
//! subresource, namespace) and nothing else.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::api::status;
use crate::Inner;

/// What a test lets a user do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The user (`system:serviceaccount:ns:name` or a person).
    pub user: String,
    /// The verb, e.g. `update`.
    pub verb: String,
    /// The API group (`""` for core).
    pub group: String,
    /// The resource, e.g. `virtualmachines`.
    pub resource: String,
    /// The subresource, e.g. `start`.
    pub subresource: String,
    /// The namespace.
    pub namespace: String,
}

/// `POST /apis/{group}/{version}/{plural}`: the two reviews.
pub(crate) async fn create_review(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, plural)): UrlPath<(String, String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(review) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body of the request is not valid JSON");
    };
    match (group.as_str(), version.as_str(), plural.as_str()) {
        ("authentication.k8s.io", "v1", "tokenreviews") => {
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let user = inner.tokens.lock().unwrap().get(token).cloned();
            let status = match user {
                Some(user) => json!({
                    "authenticated": true,
                    "user": {"username": user, "uid": format!("uid-{user}"), "groups": ["system:authenticated"]},
                }),
                None => json!({"authenticated": false, "error": "[invalid bearer token, token lookup failed]"}),
            };
            created(review, status)
        }
        ("authorization.k8s.io", "v1", "subjectaccessreviews") => {
            let spec = &review["spec"];
            let attributes = &spec["resourceAttributes"];
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let asked = Grant {
                user: text(&spec["user"]),
                verb: text(&attributes["verb"]),
                group: text(&attributes["group"]),
                resource: text(&attributes["resource"]),
                subresource: text(&attributes["subresource"]),
                namespace: text(&attributes["namespace"]),
            };
            let allowed = inner.grants.lock().unwrap().contains(&asked);
            let status = if allowed {
                json!({"allowed": true, "reason": "granted by the test"})
            } else {
                json!({"allowed": false})
            };
            created(review, status)
        }
        _ => status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
    }
}

/// The review echoed back with its status, as the API server answers a create.
fn created(mut review: Value, status: Value) -> Response {
    review["status"] = status;
    (axum::http::StatusCode::CREATED, axum::Json(review)).into_response()
}
