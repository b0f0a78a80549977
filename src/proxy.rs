//! Forwards one request to a guest over hyper's pooled client and streams the answer
//! back. Strips hop-by-hop headers (RFC 9110 §7.6.1); forwards `traceparent` and all
//! CloudEvents headers untouched; bounds the wait for the guest's response headers.
//!
//! Owns: the connection pool and header hygiene. Must not import the lifecycle, activator,
//! backend or ingress.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::ProxyConfig;
use crate::vm::Endpoint;

/// Why a request did not get an answer from the guest.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The guest did not send response headers in time (→ 504).
    #[error("the guest did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection was refused, reset or closed (→ 502; the VM is re-probed).
    #[error("the guest connection failed: {0}")]
    Unreachable(String),
    /// The request could not be built (a bug or a header the guest cannot take).
    #[error("the request could not be forwarded: {0}")]
    BadRequest(String),
}

/// The pooled client to guests. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Proxy {
    /// A client with these pool settings.
    pub fn new(config: &ProxyConfig) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Proxy { client }
    }

    /// Sends `parts` + `body` to `endpoint` at `path_and_query` and returns the guest's
    /// response with its body still streaming.
    pub async fn forward(
        &self,
        endpoint: Endpoint,
        path_and_query: &str,
        mut parts: http::request::Parts,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (authority, host) = endpoint_authority(endpoint);
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        uri.path_and_query =
            Some(http::uri::PathAndQuery::try_from(path_and_query).map_err(|e| ProxyError::BadRequest(e.to_string()))?);
        let uri = Uri::from_parts(uri).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        strip_hop_by_hop(&mut parts.headers);
        // The guest's own address, as the client would set it (but without formatting it
        // for every request).
        parts.headers.insert(header::HOST, host);
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let request = Request::from_parts(parts, Full::new(body));
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(ProxyError::Timeout(timeout)),
            Ok(Err(e)) => Err(ProxyError::Unreachable(error_chain(&e))),
            Ok(Ok(mut response)) => {
                strip_hop_by_hop(response.headers_mut());
                Ok(response)
            }
        }
    }
}

/// `endpoint` as a URI authority and a `Host` value, formatted once per endpoint and
/// thread: a warm VM's endpoint does not change between requests.
fn endpoint_authority(endpoint: Endpoint) -> (http::uri::Authority, http::HeaderValue) {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Endpoint, http::uri::Authority, http::HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((cached, authority, host)) if *cached == endpoint => (authority.clone(), host.clone()),
        _ => {
            let text = endpoint.to_string();
            let authority = http::uri::Authority::try_from(text.as_str()).expect("a socket address is an authority");
            let host = http::HeaderValue::try_from(text).expect("a socket address is a header value");
            *last = Some((endpoint, authority.clone(), host.clone()));
            (authority, host)
        }
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Removes the headers that describe one connection rather than the message: the
/// fixed list of RFC 9110 §7.6.1 plus every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Fast path, one pass with no hashing: most messages carry none of these.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Whether `name` is one of the fixed hop-by-hop headers (or `Connection`, which may
/// name more).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// A response body that keeps `guard` alive until the body has been fully streamed
/// (or the client went away), so in-flight counting covers the whole exchange.
pub struct GuardedBody<B, G> {
    body: B,
    _guard: G,
}

impl<B, G> GuardedBody<B, G> {
    /// Wraps `body`, holding `guard` until it is dropped.
    pub fn new(body: B, guard: G) -> Self {
        Self { body, _guard: guard }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for GuardedBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("ce-id", HeaderValue::from_static("abc"));
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["ce-id", "traceparent"]);
    }
}
