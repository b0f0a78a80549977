//! The HTTP routes: GET, DELETE, merge and JSON PATCH of every resource served, the
//! `/scale` subresource of scalable ones, KubeVirt's pause/unpause subresources, every
//! request recorded, and the server itself.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::list_watch::{list_or_watch_all, list_or_watch_namespaced};
use crate::{Inner, Recorded, Res};

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route(
            "/version",
            get(|| async {
                axum::Json(serde_json::json!({
                    "major": "1", "minor": "36", "gitVersion": "v1.36.2-fake", "platform": "linux/amd64",
                }))
            }),
        )
        .route("/api/v1/{plural}", get(core_list_all))
        .route("/api/v1/namespaces/{ns}/{plural}", get(core_list_namespaced))
        .route(
            "/api/v1/namespaces/{ns}/{plural}/{name}",
            get(core_get).patch(core_patch).delete(core_delete),
        )
        .route(
            "/apis/events.k8s.io/v1/namespaces/{ns}/events",
            axum::routing::post(crate::events::create_event),
        )
        .route(
            "/apis/events.k8s.io/v1/namespaces/{ns}/events/{name}",
            axum::routing::patch(crate::events::patch_event),
        )
        .route(
            "/apis/{group}/{version}/{plural}",
            get(list_or_watch_all).post(crate::reviews::create_review),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}",
            get(list_or_watch_namespaced),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
            get(get_object).patch(patch_object).delete(delete_object),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}/scale",
            get(get_scale).patch(patch_scale),
        )
        .route(
            "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/{name}/{action}",
            put(vmi_subresource),
        )
        .fallback(|| async { status(404, "NotFound", "the server could not find the requested resource") })
        .layer(axum::middleware::from_fn_with_state(inner.clone(), record_requests))
        .with_state(inner)
}

/// Applies a JSON patch as kube-apiserver does; the refusal, if it is not one (400) or
/// does not apply (422, a failed `test` included).
fn apply_json_patch(target: &mut Value, patch: Value) -> Option<Response> {
    let ops: json_patch::Patch = match serde_json::from_value(patch) {
        Ok(ops) => ops,
        Err(e) => return Some(status(400, "BadRequest", &format!("invalid JSON patch: {e}"))),
    };
    let error = json_patch::patch(target, &ops).err()?;
    Some(status(
        422,
        "Invalid",
        &format!("the server rejected our request due to an error in our request: {error}"),
    ))
}

/// Records every request (with its body) and the status it got.
pub(crate) async fn record_requests(
    State(inner): State<Arc<Inner>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
    let mut recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
        status: 0,
    };
    let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    recorded.status = response.status().as_u16();
    inner.record(recorded);
    response
}

pub(crate) fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

pub(crate) fn not_found(res: Res, name: &str) -> Response {
    status(404, "NotFound", &format!("{} \"{name}\" not found", res.qualified()))
}

fn no_such_resource() -> Response {
    status(404, "NotFound", "the server could not find the requested resource")
}

fn conflict(res: Res, name: &str) -> Response {
    status(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            res.qualified()
        ),
    )
}

type ObjectPath = UrlPath<(String, String, String, String, String)>;

async fn core_list_all(
    state: State<Arc<Inner>>,
    UrlPath(plural): UrlPath<String>,
    q: crate::list_watch::Params,
) -> Response {
    list_or_watch_all(state, UrlPath((String::new(), "v1".into(), plural)), q).await
}

async fn core_list_namespaced(
    state: State<Arc<Inner>>,
    UrlPath((ns, plural)): UrlPath<(String, String)>,
    q: crate::list_watch::Params,
) -> Response {
    list_or_watch_namespaced(state, UrlPath((String::new(), "v1".into(), ns, plural)), q).await
}

async fn core_get(
    state: State<Arc<Inner>>,
    UrlPath((ns, plural, name)): UrlPath<(String, String, String)>,
) -> Response {
    get_object(state, UrlPath((String::new(), "v1".into(), ns, plural, name))).await
}

async fn core_delete(
    state: State<Arc<Inner>>,
    UrlPath((ns, plural, name)): UrlPath<(String, String, String)>,
) -> Response {
    delete_object(state, UrlPath((String::new(), "v1".into(), ns, plural, name))).await
}

async fn core_patch(
    state: State<Arc<Inner>>,
    UrlPath((ns, plural, name)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_object(
        state,
        UrlPath((String::new(), "v1".into(), ns, plural, name)),
        headers,
        body,
    )
    .await
}

pub(crate) async fn get_object(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, ns, plural, name)): ObjectPath,
) -> Response {
    let Some(res) = Res::from_parts(&group, &version, &plural) else {
        return no_such_resource();
    };
    match inner.get(res, &ns, &name) {
        Some(object) => axum::Json(object).into_response(),
        None => not_found(res, &name),
    }
}

pub(crate) async fn delete_object(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, ns, plural, name)): ObjectPath,
) -> Response {
    let Some(res) = Res::from_parts(&group, &version, &plural) else {
        return no_such_resource();
    };
    match inner.write(res, &ns, &name, None) {
        Some(object) => axum::Json(object).into_response(),
        None => not_found(res, &name),
    }
}

/// The `autoscaling/v1` Scale of a scalable object, as kube-apiserver presents it: the
/// object's own name and resourceVersion, `spec.replicas`, and the selector as a string.
fn scale_of(object: &Value) -> Value {
    let meta = &object["metadata"];
    let selector = object["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": object["spec"]["replicas"].as_u64().unwrap_or(1)},
        "status": {"replicas": object["status"]["replicas"].as_u64().unwrap_or(0), "selector": selector},
    })
}

pub(crate) async fn get_scale(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, ns, plural, name)): ObjectPath,
) -> Response {
    let Some(res) = Res::from_parts(&group, &version, &plural).filter(|r| r.scalable()) else {
        return no_such_resource();
    };
    match inner.get(res, &ns, &name) {
        Some(object) => axum::Json(scale_of(&object)).into_response(),
        None => not_found(res, &name),
    }
}

/// A merge or JSON patch of the Scale: a `metadata.resourceVersion` in it is a
/// precondition (409 when stale); negative replicas are invalid (422).
pub(crate) async fn patch_scale(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, ns, plural, name)): ObjectPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(res) = Res::from_parts(&group, &version, &plural).filter(|r| r.scalable()) else {
        return no_such_resource();
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body of the request is not valid JSON");
    };
    let media = media_type(&headers);
    let _serial = PATCH_LOCK.lock().await;
    let Some(mut object) = inner.get(res, &ns, &name) else {
        return not_found(res, &name);
    };
    let raced = inner
        .scale_races
        .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
        .is_ok();
    if raced {
        object["status"]["observedGeneration"] = json!(object["metadata"]["generation"]);
        object = inner.write(res, &ns, &name, Some(object)).expect("the object exists");
    }
    let mut scale = scale_of(&object);
    let current_rv = scale["metadata"]["resourceVersion"].clone();
    match media.as_str() {
        "application/merge-patch+json" => json_patch::merge(&mut scale, &patch),
        "application/json-patch+json" => {
            if let Some(refused) = apply_json_patch(&mut scale, patch) {
                return refused;
            }
        }
        _ => {
            return status(
                415,
                "UnsupportedMediaType",
                &format!("unsupported patch content type {media:?}"),
            )
        }
    }
    if scale["metadata"]["resourceVersion"] != current_rv {
        return conflict(res, &name);
    }
    let Some(replicas) = scale["spec"]["replicas"].as_i64() else {
        return status(422, "Invalid", "spec.replicas: Required value");
    };
    if replicas < 0 {
        return status(
            422,
            "Invalid",
            &format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"),
        );
    }
    object["spec"]["replicas"] = json!(replicas);
    match inner.write(res, &ns, &name, Some(object)) {
        Some(written) => axum::Json(scale_of(&written)).into_response(),
        None => not_found(res, &name),
    }
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

pub(crate) async fn patch_object(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, ns, plural, name)): ObjectPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(res) = Res::from_parts(&group, &version, &plural) else {
        return no_such_resource();
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == "application/strategic-merge-patch+json" {
        return status(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body of the request is not valid JSON");
    };
    // Read, patch and write under one lock so concurrent patches serialise as in etcd.
    let _serial = PATCH_LOCK.lock().await;
    let Some(mut object) = inner.get(res, &ns, &name) else {
        return not_found(res, &name);
    };
    let original_rv = object["metadata"]["resourceVersion"].clone();
    match media {
        "application/merge-patch+json" => {
            if let Some(wanted) = patch.pointer("/metadata/resourceVersion") {
                if *wanted != original_rv {
                    return conflict(res, &name);
                }
            }
            json_patch::merge(&mut object, &patch);
        }
        "application/json-patch+json" => {
            if let Some(refused) = apply_json_patch(&mut object, patch) {
                return refused;
            }
        }
        _ => {
            return status(
                415,
                "UnsupportedMediaType",
                &format!("unsupported patch content type {content_type:?}"),
            )
        }
    }
    if object["metadata"]["name"] != name.as_str() || object["metadata"]["namespace"] != ns.as_str() {
        return status(422, "Invalid", "metadata.name and metadata.namespace cannot be changed");
    }
    // KubeVirt's admission webhook.
    if res == Res::Vm
        && object["spec"].get("running").is_some_and(|r| !r.is_null())
        && object["spec"].get("runStrategy").is_some_and(|r| !r.is_null())
    {
        return status(
            422,
            "Invalid",
            "admission webhook \"virtualmachine-validator.kubevirt.io\" denied the request: Running and RunStrategy are mutually exclusive",
        );
    }
    strip_nulls(&mut object);
    match inner.write(res, &ns, &name, Some(object)) {
        Some(written) => axum::Json(written).into_response(),
        None => not_found(res, &name),
    }
}

pub(crate) static PATCH_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) fn strip_nulls(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|_, v| !v.is_null());
        for v in map.values_mut() {
            strip_nulls(v);
        }
    }
}

pub(crate) async fn vmi_subresource(
    State(inner): State<Arc<Inner>>,
    UrlPath((ns, name, action)): UrlPath<(String, String, String)>,
) -> Response {
    let Some(mut vmi) = inner.get(Res::Vmi, &ns, &name) else {
        return not_found(Res::Vmi, &name);
    };
    let paused = vmi["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Paused"));
    match (action.as_str(), paused) {
        ("pause", false) => {
            let conditions = vmi["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut conditions = conditions;
            conditions.push(json!({"type": "Paused", "status": "True"}));
            vmi["status"]["conditions"] = json!(conditions);
        }
        ("unpause", true) => {
            let conditions: Vec<Value> = vmi["status"]["conditions"]
                .as_array()
                .map(|c| c.iter().filter(|c| c["type"] != "Paused").cloned().collect())
                .unwrap_or_default();
            vmi["status"]["conditions"] = json!(conditions);
        }
        ("pause", true) => return status(409, "Conflict", "VMI is already paused"),
        ("unpause", false) => return status(409, "Conflict", "VMI is not paused"),
        _ => return status(404, "NotFound", "the server could not find the requested resource"),
    }
    inner.write(Res::Vmi, &ns, &name, Some(vmi));
    StatusCode::OK.into_response()
}

/// Serves `router` on `listener`; aborting the task cuts every connection it accepted.
pub(crate) async fn serve_router(listener: TcpListener, router: Router) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        connections.spawn(async move {
            let service = hyper_service(router);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Serves the API `router` on `listener` until `refusing` turns true; then accepts no
/// more (the listener is closed: connections are refused) and closes each connection
/// once the request it serves is done — a watch goes on until it ends — as Go's
/// `http.Server.Shutdown` does for a terminating kube-apiserver.
pub(crate) async fn serve_api(listener: TcpListener, router: Router, refusing: tokio::sync::watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let stop = refusing.clone();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = until_refusing(stop.clone()) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_service(router.clone());
        let refusing = refusing.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = until_refusing(refusing) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn until_refusing(mut refusing: tokio::sync::watch::Receiver<bool>) {
    let _ = refusing.wait_for(|refusing| *refusing).await;
}

pub(crate) fn hyper_service(router: Router) -> hyper_util::service::TowerToHyperService<Router> {
    hyper_util::service::TowerToHyperService::new(router)
}
