//! `events.k8s.io/v1` Events as kube-apiserver takes them from a recorder: create (a
//! name taken is 409) and merge patch (a series update; unknown is 404). Kept apart from
//! the watched resources: nothing watches Events here; tests read them
//! (`FakeKube::k8s_events`).

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::api::status;
use crate::Inner;

/// `POST /apis/events.k8s.io/v1/namespaces/{ns}/events`.
pub(crate) async fn create_event(
    State(inner): State<Arc<Inner>>,
    UrlPath(ns): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(mut event) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body of the request is not valid JSON");
    };
    let Some(name) = event["metadata"]["name"].as_str().map(str::to_string) else {
        return status(422, "Invalid", "metadata.name: Required value");
    };
    if event["reportingController"].as_str().is_none_or(str::is_empty) {
        return status(422, "Invalid", "reportingController: Required value");
    }
    let mut events = inner.k8s_events.lock().unwrap();
    let key = (ns.clone(), name.clone());
    if events.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("events.events.k8s.io \"{name}\" already exists"),
        );
    }
    event["metadata"]["namespace"] = Value::String(ns);
    event["metadata"]["resourceVersion"] = Value::String("1".into());
    events.insert(key, event.clone());
    (StatusCode::CREATED, axum::Json(event)).into_response()
}

/// `PATCH /apis/events.k8s.io/v1/namespaces/{ns}/events/{name}` (merge patch).
pub(crate) async fn patch_event(
    State(inner): State<Arc<Inner>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body of the request is not valid JSON");
    };
    let mut events = inner.k8s_events.lock().unwrap();
    let Some(event) = events.get_mut(&(ns, name.clone())) else {
        return status(404, "NotFound", &format!("events.events.k8s.io \"{name}\" not found"));
    };
    json_patch::merge(event, &patch);
    (StatusCode::OK, axum::Json(event.clone())).into_response()
}
