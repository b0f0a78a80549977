//! LIST (paginated with `limit`/`continue`, except from the watch cache with
//! `resourceVersion=0`) and WATCH (chunked JSON lines, bookmarks, synthetic ADDED events
//! for `resourceVersion=0`, 410 Gone for a compacted version).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::api::status;
use crate::selector::Selector;
use crate::store::Change;
use crate::{Inner, Res};

pub(crate) type Params = Query<HashMap<String, String>>;

pub(crate) async fn list_or_watch_all(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, plural)): UrlPath<(String, String, String)>,
    Query(q): Params,
) -> Response {
    match Res::from_parts(&group, &version, &plural) {
        Some(res) => list_or_watch(inner, None, res, q).await,
        None => status(404, "NotFound", "the server could not find the requested resource"),
    }
}

pub(crate) async fn list_or_watch_namespaced(
    State(inner): State<Arc<Inner>>,
    UrlPath((group, version, ns, plural)): UrlPath<(String, String, String, String)>,
    Query(q): Params,
) -> Response {
    match Res::from_parts(&group, &version, &plural) {
        Some(res) => list_or_watch(inner, Some(ns), res, q).await,
        None => status(404, "NotFound", "the server could not find the requested resource"),
    }
}

pub(crate) async fn list_or_watch(
    inner: Arc<Inner>,
    ns: Option<String>,
    res: Res,
    q: HashMap<String, String>,
) -> Response {
    let selector = match Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &format!("unable to parse requirement: {e}")),
    };
    let rv = q.get("resourceVersion").cloned().unwrap_or_default();
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        return watch(inner, res, ns, selector, rv, bookmarks, timeout);
    }
    let store = inner.store.lock().unwrap();
    if let Ok(asked) = rv.parse::<u64>() {
        if asked > 0 && asked < store.compacted && q.get("resourceVersionMatch").is_some_and(|m| m == "Exact") {
            return status(
                410,
                "Expired",
                &format!("too old resource version: {asked} ({})", store.compacted),
            );
        }
    }
    // Pagination as kube-apiserver does it: `limit` pages through a consistent list
    // (served from etcd) with an opaque `continue` token; with `resourceVersion=0` the
    // list is served from the watch cache, which ignores `limit` and returns everything.
    let continue_from = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => match token.split('|').collect::<Vec<_>>().as_slice() {
            [rv, after_ns, after_name] if rv.parse::<u64>().is_ok_and(|rv| rv >= store.compacted) => {
                Some((rv.to_string(), (after_ns.to_string(), after_name.to_string())))
            }
            _ => {
                return status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result.",
                )
            }
        },
        None => None,
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0 && rv != "0");
    let list_rv = continue_from
        .as_ref()
        .map(|(rv, _)| rv.clone())
        .unwrap_or_else(|| store.rv.to_string());
    let mut matching = store
        .objects
        .iter()
        .filter(|((r, n, _), o)| *r == res && ns.as_ref().is_none_or(|ns| ns == n) && selector.matches(o))
        .filter(|((_, n, name), _)| {
            continue_from
                .as_ref()
                .is_none_or(|(_, (after_ns, after_name))| (n, name) > (after_ns, after_name))
        });
    let mut items = Vec::new();
    let mut last_key = None;
    for ((_, n, name), object) in matching.by_ref() {
        items.push(object.clone());
        last_key = Some(format!("{n}|{name}"));
        if limit.is_some_and(|l| items.len() >= l) {
            break;
        }
    }
    let remaining = matching.count();
    let mut metadata = json!({"resourceVersion": list_rv});
    if remaining > 0 {
        if let Some(key) = last_key {
            metadata["continue"] = json!(format!("{list_rv}|{key}"));
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let body = json!({
        "apiVersion": res.api_version(),
        "kind": format!("{}List", res.kind()),
        "metadata": metadata,
        "items": items,
    });
    axum::Json(body).into_response()
}

/// A watch: replays history after `rv` (or synthetic ADDED for `rv` 0/empty), then
/// live changes, with bookmarks, until the timeout or the client leaves.
pub(crate) fn watch(
    inner: Arc<Inner>,
    res: Res,
    ns: Option<String>,
    selector: Selector,
    rv: String,
    bookmarks: bool,
    timeout: Duration,
) -> Response {
    let mut live = inner.changes.subscribe();
    let mut epoch = inner.watch_epoch.subscribe();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let in_scope = move |r: Res, o: &Value| r == res && ns.as_deref().is_none_or(|ns| o["metadata"]["namespace"] == ns);
    let line = |kind: &str, object: &Value| Ok(Bytes::from(format!("{}\n", json!({"type": kind, "object": object}))));
    let (initial, mut last_rv) = {
        let store = inner.store.lock().unwrap();
        match rv.parse::<u64>().unwrap_or(0) {
            0 => {
                let lines: Vec<_> = store
                    .objects
                    .iter()
                    .filter(|((r, _, _), o)| in_scope(*r, o) && selector.matches(o))
                    .map(|(_, o)| line("ADDED", o))
                    .collect();
                (lines, store.rv)
            }
            asked if asked < store.compacted => {
                let gone = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {asked} ({})", store.compacted),
                    "reason": "Expired", "code": 410,
                });
                (vec![line("ERROR", &gone)], u64::MAX)
            }
            asked => {
                let lines: Vec<_> = store
                    .history
                    .iter()
                    .filter(|c| c.rv > asked && in_scope(c.res, &c.object))
                    .filter_map(|c| selected(c, &selector).map(|kind| line(kind, &c.object)))
                    .collect();
                (lines, store.rv)
            }
        }
    };
    let (bookmark_every, delay) = {
        let options = inner.options.lock().unwrap();
        (options.bookmark_interval, options.watch_delay)
    };
    tokio::spawn(async move {
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if last_rv == u64::MAX {
            return; // 410: the client re-lists.
        }
        let deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        loop {
            let next = tokio::select! {
                change = live.recv() => match change {
                    Ok(c) => Some(c),
                    // Fell behind the broadcast buffer: end the watch, the client resumes.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => None,
                _ = tokio::time::sleep_until(deadline) => return,
                _ = epoch.changed() => return,
                _ = tx.closed() => return,
            };
            let sent = match next {
                Some(c) if c.rv > last_rv => {
                    last_rv = c.rv;
                    tokio::time::sleep_until(c.at + delay).await;
                    match selected(&c, &selector).filter(|_| in_scope(c.res, &c.object)) {
                        Some(kind) => tx.send(line(kind, &c.object)).await,
                        None => Ok(()),
                    }
                }
                Some(_) => Ok(()),
                None => {
                    // As kube-apiserver: a bookmark never runs ahead of the changes this
                    // watch has passed on (a client resuming from it must miss nothing).
                    let mark = json!({"apiVersion": res.api_version(), "kind": res.kind(), "metadata": {"resourceVersion": last_rv.to_string()}});
                    tx.send(line("BOOKMARK", &mark)).await
                }
            };
            if sent.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap()
}

/// The event type a watch with `selector` sees for a change, if any: objects entering
/// the selector are ADDED, leaving it DELETED.
pub(crate) fn selected(c: &Change, selector: &Selector) -> Option<&'static str> {
    let now = selector.matches(&c.object) && c.kind != "DELETED";
    let before = c.old.as_ref().is_some_and(|o| selector.matches(o));
    match (before, now) {
        (_, true) if c.kind == "ADDED" => Some("ADDED"),
        (true, true) => Some("MODIFIED"),
        (false, true) => Some("ADDED"),
        (true, false) => Some("DELETED"),
        (false, false) if c.kind == "DELETED" && selector.matches(&c.object) => Some("DELETED"),
        (false, false) => None,
    }
}
