//! The requests a user made, read back from the API server's audit log.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use fake_kube::Recorded;
use serde_json::Value;

/// Reads the audit log incrementally and keeps the requests of each user.
pub(super) struct AuditReader {
    path: PathBuf,
    offset: u64,
    by_user: HashMap<String, Vec<Recorded>>,
}

impl AuditReader {
    /// Reads from the log's current end.
    pub(super) fn at_end(path: PathBuf) -> AuditReader {
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        AuditReader {
            path,
            offset,
            by_user: HashMap::new(),
        }
    }

    /// Reads what was appended since, then returns `user`'s requests so far.
    pub(super) fn requests_of(&mut self, user: &str) -> Vec<fake_kube::Recorded> {
        self.read_new();
        self.by_user.get(user).cloned().unwrap_or_default()
    }

    fn read_new(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !line.ends_with('\n') {
                break; // half-written: read it next time
            }
            self.offset += line.len() as u64;
            if let Some((user, recorded)) = parse_audit_event(&line) {
                self.by_user.entry(user).or_default().push(recorded);
            }
            line.clear();
        }
    }
}

/// One completed (or, for a watch, started) request as `Recorded`. The audit log has no
/// content type: a JSON array body is a JSON patch, an object a merge patch (the only
/// two kinds the activator sends).
fn parse_audit_event(line: &str) -> Option<(String, Recorded)> {
    let event: Value = serde_json::from_str(line).ok()?;
    let verb = event["verb"].as_str()?;
    let stage = event["stage"].as_str()?;
    let complete = stage == "ResponseComplete" || (verb == "watch" && stage == "ResponseStarted");
    if !complete || (verb == "watch" && stage == "ResponseComplete") {
        return None;
    }
    let uri = event["requestURI"].as_str()?;
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let body = &event["requestObject"];
    let content_type = match (verb, body) {
        ("patch", Value::Array(_)) => "application/json-patch+json",
        ("patch", _) => "application/merge-patch+json",
        (_, Value::Null) => "",
        _ => "application/json",
    };
    let method = match verb {
        "get" | "list" | "watch" => "GET",
        "patch" => "PATCH",
        "update" => "PUT",
        "create" => "POST",
        "delete" | "deletecollection" => "DELETE",
        other => other,
    };
    let recorded = Recorded {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        content_type: content_type.to_string(),
        body: if body.is_null() {
            String::new()
        } else {
            body.to_string()
        },
        status: event["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
    };
    Some((event["user"]["username"].as_str()?.to_string(), recorded))
}
