//! A response on the wire: the status line and headers, and how the body is framed —
//! as hyper's server frames it: no body for HEAD requests and 1xx/204/304; the
//! response's own `Content-Length` if it has one, else the body's exact size when it is
//! known, else chunked (HTTP/1.1) or until the connection closes (HTTP/1.0). A `Date`
//! header is added (formatted once per second), and `Connection: close` when the
//! connection will close.
//!
//! Pure: no I/O.

use std::cell::RefCell;
use std::io::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use http::header::{self, HeaderMap};
use http::{StatusCode, Version};

/// How a response body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all (whatever the response's body holds is not sent).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked: each frame a chunk, then the last chunk.
    Chunked,
    /// Until the connection closes (HTTP/1.0 without a length).
    UntilClose,
}

/// The response head's framing, given the request's method and version, the response's
/// status and headers, and the body's exact size if known.
pub fn framing(
    head_request: bool,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    exact_size: Option<u64>,
) -> BodyFraming {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return BodyFraming::None;
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| crate::http1::fields::digits(v.as_bytes()));
    match (declared.or(exact_size), version) {
        (Some(len), _) => BodyFraming::Length(len),
        (None, Version::HTTP_11) => BodyFraming::Chunked,
        (None, _) => BodyFraming::UntilClose,
    }
}

/// Writes the status line and headers into `out`: the response's own headers (without
/// framing headers it contradicts), then `content-length` or `transfer-encoding`, `date`
/// and `connection` as needed.
pub fn head(
    out: &mut Vec<u8>,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    framing: BodyFraming,
    close: bool,
) {
    out.extend_from_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // Framing and connection headers are this hop's: written below.
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        BodyFraming::Length(len) => {
            // Not `write!`: formatting machinery per response, for one integer.
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyFraming::None => {
            // A HEAD answer still says how long the body would be.
            if let Some(len) = headers.get(header::CONTENT_LENGTH) {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(len.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        BodyFraming::UntilClose => {}
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a chunk's size line for `len` bytes of data.
pub fn chunk_head(out: &mut Vec<u8>, len: usize) {
    let _ = write!(out, "{len:X}\r\n");
}

/// The end of a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The current time as an HTTP date, formatted at most once per second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    // Read from the kernel's coarse clock: a date to the second needs no more, and
    // this is read once per response.
    let second = crate::clock::coarse_unix_seconds();
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != second || text.is_empty() {
            *at = second;
            *text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn text(framing: BodyFraming, headers: &HeaderMap, close: bool, version: Version) -> String {
        let mut out = Vec::new();
        head(&mut out, version, StatusCode::ACCEPTED, headers, framing, close);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn bodies_are_framed_as_hyper_frames_them() {
        let none = HeaderMap::new();
        let mut with_length = HeaderMap::new();
        with_length.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        let f =
            |head_req, status, headers: &HeaderMap, exact| framing(head_req, Version::HTTP_11, status, headers, exact);
        assert_eq!(f(false, StatusCode::OK, &with_length, Some(3)), BodyFraming::Length(7));
        assert_eq!(f(false, StatusCode::OK, &none, Some(3)), BodyFraming::Length(3));
        assert_eq!(f(false, StatusCode::OK, &none, None), BodyFraming::Chunked);
        assert_eq!(f(true, StatusCode::OK, &with_length, None), BodyFraming::None);
        assert_eq!(f(false, StatusCode::NO_CONTENT, &none, Some(0)), BodyFraming::None);
        assert_eq!(
            framing(false, Version::HTTP_10, StatusCode::OK, &none, None),
            BodyFraming::UntilClose
        );
    }

    #[test]
    fn the_head_says_length_date_and_connection() {
        let mut headers = HeaderMap::new();
        headers.insert("ce-id", HeaderValue::from_static("1"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let head = text(BodyFraming::Length(2), &headers, true, Version::HTTP_11);
        assert!(
            head.starts_with("HTTP/1.1 202 Accepted\r\nce-id: 1\r\ncontent-length: 2\r\ndate: "),
            "{head}"
        );
        assert!(head.ends_with("connection: close\r\n\r\n"), "{head}");
        assert!(
            !head.contains("transfer-encoding"),
            "a contradicting framing header is dropped"
        );
        let head = text(BodyFraming::Chunked, &HeaderMap::new(), false, Version::HTTP_11);
        assert!(head.contains("transfer-encoding: chunked\r\n") && !head.contains("connection"));
        let head = text(BodyFraming::Length(0), &HeaderMap::new(), false, Version::HTTP_10);
        assert!(head.starts_with("HTTP/1.0 202") && head.contains("connection: keep-alive\r\n"));
        let mut out = Vec::new();
        chunk_head(&mut out, 255);
        assert_eq!(out, b"FF\r\n");
    }
}
