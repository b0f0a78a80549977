//! An ingress path, `/{namespace}/{vm}[/{rest}]`: parsed and percent-decoded (refusing
//! traversal in any encoding), and the guest request target it maps to under the VM's
//! path prefix.

use std::borrow::Cow;

use bytes::Bytes;

use super::cloudevent;
use super::response::IngressError;

/// The parts of an ingress path.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Target<'a> {
    pub(super) namespace: Cow<'a, str>,
    pub(super) name: Cow<'a, str>,
    /// The rest of the path after `/{namespace}/{vm}`, still percent-encoded, no leading '/'.
    pub(super) rest: &'a str,
}

/// One path segment, percent-decoded (borrowed when there is nothing to decode: without
/// a '%' the segment is already the text it stands for).
fn decode(segment: &str) -> Result<Cow<'_, str>, IngressError> {
    // A byte loop, not `contains`: segments are short, and a search's set-up costs more
    // than the walk.
    if !segment.bytes().any(|b| b == b'%') {
        return Ok(Cow::Borrowed(segment));
    }
    cloudevent::percent_decode(segment.as_bytes()).map_err(|e| IngressError::BadPath(format!("{segment:?}: {e}")))
}

impl<'a> Target<'a> {
    pub(super) fn parse(path: &'a str) -> Result<Target<'a>, IngressError> {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        // `/{namespace}/{vm}[/{rest}]`, split at its first two slashes by byte loops (a
        // path is short: a search's set-up costs more than the walk).
        let slash = |s: &str| s.bytes().position(|b| b == b'/');
        let Some(first) = slash(trimmed) else {
            return Err(IngressError::NoRoute(path.to_string()));
        };
        let (ns, tail) = (&trimmed[..first], &trimmed[first + 1..]);
        let (name, rest) = match slash(tail) {
            Some(second) => (&tail[..second], &tail[second + 1..]),
            None => (tail, ""),
        };
        if ns.is_empty() || name.is_empty() {
            return Err(IngressError::NoRoute(path.to_string()));
        }
        // An empty rest (the usual `/{namespace}/{vm}`) has no segment to check.
        for segment in rest.split('/').filter(|_| !rest.is_empty()) {
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

    /// The part of the path the guest's request target is made of.
    pub(super) fn rest(&self) -> Rest<'a> {
        Rest(self.rest)
    }

    #[cfg(test)]
    fn guest_uri(&self, prefix: &str, query: Option<&str>) -> Result<http::Uri, IngressError> {
        self.rest().guest_uri(prefix, query)
    }

    #[cfg(test)]
    fn guest_path(&self, prefix: &str, query: Option<&str>) -> String {
        self.rest().guest_path(prefix, query)
    }
}

/// The rest of an ingress path after `/{namespace}/{vm}`, still percent-encoded, no
/// leading '/': all a request keeps of its path once its VM is known.
#[derive(Clone, Copy)]
pub(super) struct Rest<'a>(&'a str);

impl Rest<'_> {
    /// The guest request target: the VM's prefix joined to `rest` with exactly one '/',
    /// plus the query. The common case — the prefix alone — is parsed once per prefix
    /// and thread and then shared (no allocation); otherwise the joined path's buffer
    /// becomes the URI without a copy.
    pub(super) fn guest_uri(&self, prefix: &str, query: Option<&str>) -> Result<http::Uri, IngressError> {
        thread_local! {
            static PREFIX: std::cell::RefCell<Option<(String, http::Uri)>> = const { std::cell::RefCell::new(None) };
        }
        let invalid = |e: http::uri::InvalidUri| IngressError::BadPath(format!("guest path: {e}"));
        if self.0.is_empty() && query.is_none() {
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
        let mut path = String::with_capacity(prefix.len() + self.0.len() + 2);
        path.push_str(prefix);
        if !self.0.is_empty() {
            if !path.ends_with('/') {
                path.push('/');
            }
            path.push_str(self.0);
        }
        if let Some(query) = query {
            path.push('?');
            path.push_str(query);
        }
        path
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
            "/default/demo/a\\..\\b",
            "/default/%zz",
        ] {
            assert!(matches!(Target::parse(path), Err(IngressError::BadPath(_))), "{path}");
        }
        for path in ["/onlyone", "/", "", "/default/", "//demo", "/default//x"] {
            assert!(matches!(Target::parse(path), Err(IngressError::NoRoute(_))), "{path:?}");
        }
        let t = Target::parse("default/demo/").unwrap();
        assert_eq!((&*t.namespace, &*t.name, t.rest), ("default", "demo", ""));
    }
}
