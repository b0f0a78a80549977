//! Admin routes on their own listener: `/metrics` (Prometheus text), `/healthz`
//! (process alive), `/readyz` (backend connected and not draining), `/v1/vms` (what
//! each VM is doing) and `POST /v1/vms/{namespace}/{name}/start|stop|pause|hibernate` (scale an idle
//! VM down now). Keep this listener inside the cluster: it names every VM, and any
//! caller can make an idle VM pay one more cold start.
//!
//! Owns: the admin HTTP surface. Must not import `ingress` or backend implementations.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::VerbGuard;
use crate::activator::Activator;
use crate::backend::AdminVerb;
use crate::lifecycle::{Action, ScaleDownRefused, VmHandle};

/// One VM in `/v1/vms`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct VmView {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// What the name stands for: `VirtualMachine`, `Deployment`, `StatefulSet`, or a
    /// configured kind.
    #[serde(default)]
    pub kind: String,
    /// Gate phase (`stopped`, `starting`, `probing`, `ready`, `stopping`, `paused`, `hibernated`, `failed`).
    pub state: String,
    /// The guest's `host:port` while it runs (the first, when there are several).
    pub endpoint: Option<String>,
    /// Every endpoint taking traffic (the ready pods of a scaled workload; one for a VM).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Requests held.
    pub buffered: usize,
    /// Requests in flight to the guest.
    pub in_flight: usize,
    /// Last request activity (RFC 3339, milliseconds), if any.
    pub last_activity: Option<String>,
    /// Duration of the last cold start in milliseconds, if any.
    pub last_cold_start_ms: Option<u64>,
    /// Why the last start failed or the VM stopped unexpectedly, if it did.
    pub last_error: Option<String>,
    /// Why events to this name are refused (409 `conflict`), e.g. two opted-in
    /// workloads share it.
    #[serde(default)]
    pub refused: Option<String>,
    /// What the backend says it is waiting for or why it is not running, e.g. "0 of 2
    /// pod(s) ready" or "no address on network apps/vlan-10 yet".
    #[serde(default)]
    pub reason: Option<String>,
    /// Problems with the VM's settings (bad annotation values replaced by defaults).
    pub warnings: Vec<String>,
    /// The idle policy in force and, under the adaptive one, its current decision.
    #[serde(default)]
    pub idle: IdleView,
}

/// The idle policy of one VM in `/v1/vms`.
#[derive(Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct IdleView {
    /// `fixed` or `adaptive`.
    pub policy: String,
    /// Adaptive: whether the decision comes from the VM's history (not the idle timeout
    /// it falls back to while the history is too short).
    #[serde(default)]
    pub learned: bool,
    /// Adaptive: idle periods in the history.
    #[serde(default)]
    pub samples: u32,
    /// How long the VM stays up after its last activity before it is scaled down
    /// (milliseconds): the idle timeout, or the adaptive keep-alive.
    pub keep_alive_ms: u64,
    /// Adaptive: when the VM will be started ahead of its next expected event (RFC 3339),
    /// if it will.
    #[serde(default)]
    pub next_prewarm: Option<String>,
}

/// The admin router.
pub fn router(activator: Arc<Activator>, verbs: VerbGuard) -> Router {
    let state = Admin { activator, verbs };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/vms", get(vms))
        .route("/v1/vms/{namespace}/{name}/start", post(start))
        .route("/v1/vms/{namespace}/{name}/stop", post(stop))
        .route("/v1/vms/{namespace}/{name}/pause", post(pause))
        .route("/v1/vms/{namespace}/{name}/hibernate", post(hibernate))
        .with_state(state)
}

/// What the admin handlers share.
#[derive(Clone)]
struct Admin {
    activator: Arc<Activator>,
    verbs: VerbGuard,
}

impl axum::extract::FromRef<Admin> for Arc<Activator> {
    fn from_ref(admin: &Admin) -> Arc<Activator> {
        admin.activator.clone()
    }
}

async fn metrics(State(activator): State<Arc<Activator>>) -> Response {
    activator
        .metrics()
        .set_ready(!activator.is_draining() && activator.backend().is_connected());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        activator.metrics().render(),
    )
        .into_response()
}

async fn readyz(State(activator): State<Arc<Activator>>) -> Response {
    if activator.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !activator.backend().is_connected() {
        (StatusCode::SERVICE_UNAVAILABLE, "backend not connected").into_response()
    } else {
        "ready".into_response()
    }
}

async fn vms(State(activator): State<Arc<Activator>>) -> Json<Vec<VmView>> {
    Json(activator.vms().iter().map(|vm| view(&activator, vm)).collect())
}

/// What `/v1/vms` says of one VM.
fn view(activator: &Activator, vm: &VmHandle) -> VmView {
    let gate = vm.gate();
    let state = gate.state();
    let last_activity = gate.last_activity_if_any().map(|at| {
        let wall = SystemTime::now() - Instant::now().saturating_duration_since(at);
        humantime::format_rfc3339_millis(wall).to_string()
    });
    VmView {
        namespace: vm.key().namespace.clone(),
        name: vm.key().name.clone(),
        kind: state.policy.kind.clone(),
        state: state.phase.to_string(),
        endpoint: state.endpoint().map(|e| e.to_string()),
        endpoints: state.targets.iter().map(|t| t.endpoint().to_string()).collect(),
        buffered: gate.held().0,
        in_flight: gate.in_flight(),
        last_activity,
        last_cold_start_ms: gate.last_cold_start().map(|d| d.as_millis() as u64),
        last_error: state.last_error.map(|e| e.to_string()),
        refused: state.policy.refused.clone(),
        reason: activator.backend().status_message(vm.key()),
        warnings: state.policy.warnings.clone(),
        idle: match vm.idle_decision() {
            Some(decision) => IdleView {
                policy: decision.policy.to_string(),
                learned: decision.learned,
                samples: decision.samples,
                keep_alive_ms: decision.keep_alive.as_millis() as u64,
                next_prewarm: decision
                    .next_prewarm
                    .map(|at| humantime::format_rfc3339_millis(at).to_string()),
            },
            None => IdleView {
                policy: "fixed".into(),
                keep_alive_ms: state.policy.idle_timeout.as_millis() as u64,
                ..IdleView::default()
            },
        },
    }
}

/// `POST …/start`: 202 with the VM's view once the start is issued (or at once if it
/// runs or is on its way); 404 for an unknown VM, 409 for a refused name, 503 while
/// draining; 401/403 from the verb guard.
async fn start(
    State(admin): State<Admin>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let activator = &admin.activator;
    let Some(vm) = activator.vm_or_sync(&namespace, &name) else {
        return unknown_vm(&namespace, &name);
    };
    if let Err(refused) = admin.verbs.check(&headers, activator, vm.key(), AdminVerb::Start).await {
        return refused.into_response();
    }
    if let Some(reason) = &vm.gate().policy().refused {
        let body = json!({"error": "conflict", "detail": reason});
        return (StatusCode::CONFLICT, Json(body)).into_response();
    }
    match vm.warm().await {
        Ok(_) => (StatusCode::ACCEPTED, Json(view(activator, &vm))).into_response(),
        Err(error) => {
            let body = json!({"error": "unavailable", "detail": error.to_string()});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

fn unknown_vm(namespace: &str, name: &str) -> Response {
    let body =
        json!({"error": "unknown_vm", "detail": format!("no VM {namespace}/{name} is managed by this activator")});
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn stop(
    State(admin): State<Admin>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    scale_down(&admin, &headers, &namespace, &name, Action::Stop).await
}

async fn pause(
    State(admin): State<Admin>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    scale_down(&admin, &headers, &namespace, &name, Action::Pause).await
}

async fn hibernate(
    State(admin): State<Admin>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    scale_down(&admin, &headers, &namespace, &name, Action::Hibernate).await
}

/// 202 with the VM's view once the scale-down has begun; 409 if the VM is busy or not
/// in a phase the action applies to; 404 for an unknown VM.
async fn scale_down(admin: &Admin, headers: &HeaderMap, namespace: &str, name: &str, action: Action) -> Response {
    let activator = &admin.activator;
    let Some(vm) = activator.vm_or_sync(namespace, name) else {
        return unknown_vm(namespace, name);
    };
    let verb = match action {
        Action::Stop => AdminVerb::Stop,
        Action::Pause => AdminVerb::Pause,
        Action::Hibernate => AdminVerb::Hibernate,
    };
    if let Err(refused) = admin.verbs.check(headers, activator, vm.key(), verb).await {
        return refused.into_response();
    }
    match vm.scale_down(action).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(view(activator, &vm))).into_response(),
        Err(refused) => {
            let code = match refused {
                ScaleDownRefused::Busy { .. } => "busy",
                ScaleDownRefused::NotApplicable(..) => "not_applicable",
                ScaleDownRefused::Removed => "unknown_vm",
            };
            let body = json!({"error": code, "detail": refused.to_string()});
            (StatusCode::CONFLICT, Json(body)).into_response()
        }
    }
}
