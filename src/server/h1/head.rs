//! A request head: parsed with `httparse` from the connection's buffer (the header
//! fields and the target stay in its bytes, no copy and no header map), its framing decided by RFC 9112
//! §6.3 exactly as hyper's server decides it — the rows of the request-smuggling table
//! in `tests/h1.rs` are refused here as hyper refuses them:
//!
//! - `Transfer-Encoding` in HTTP/1.0, or one whose last coding is not `chunked`: 400;
//! - `Transfer-Encoding` and `Content-Length` together: chunked, the length dropped, and
//!   the connection closed after the exchange;
//! - a `Content-Length` that is not all digits (or overflows), or several that differ: 400
//!   (several equal ones are one);
//! - anything `httparse` refuses (obs-fold, a space before a colon, a bad token): 400;
//!   more than [`MAX_HEADERS`] headers or a head over the limit: 431; a target over
//!   65,534 bytes: 414.
//!
//! Pure: no I/O. Fuzzed by `tests/fuzz/fuzz_targets/h1.rs`.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};

use crate::http1::fields::{digits, last_coding_is_chunked, Persistence};
use crate::http1::lines::Lines;
use http::{Method, Uri, Version};

pub use crate::http1::MAX_HEADERS;
/// The longest request target (hyper's).
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// The longest header name (`http`'s: hyper refuses a longer one).
const MAX_NAME_LEN: usize = u16::MAX as usize;

/// Where a header's name and value are in the head: (name at, name length, value at,
/// value length).
type Span = (usize, usize, usize, usize);

/// How the request's body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// The method.
    pub method: Method,
    /// The request target (origin form), sharing the head's bytes.
    pub uri: Uri,
    /// HTTP/1.1 or HTTP/1.0.
    pub version: Version,
    /// The header fields, where they are in the head's bytes (of several equal
    /// `Content-Length`s, one; with `Transfer-Encoding`, none).
    pub headers: Lines,
    /// How the body is framed.
    pub framing: Framing,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// Why a head is refused: the status of the automatic answer (the connection closes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Malformed: 400.
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    /// Too many headers, or a head over the limit: 431.
    #[error("request head too large")]
    TooLarge,
    /// The target is too long: 414.
    #[error("request target too long")]
    UriTooLong,
}

impl HeadError {
    /// The status of the automatic answer.
    pub fn status(self) -> http::StatusCode {
        match self {
            HeadError::Malformed(_) => http::StatusCode::BAD_REQUEST,
            HeadError::TooLarge => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UriTooLong => http::StatusCode::URI_TOO_LONG,
        }
    }
}

/// Parses a head at the start of `buf`: `Ok(None)` while it is incomplete (and within
/// `max_head` bytes), else the head with its bytes split off `buf` (what follows, the
/// body's start or a pipelined request, stays).
pub fn parse(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, HeadError> {
    let mut storage: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut request, buf, &mut storage);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Token) if request.method.is_none() => return Err(HeadError::Malformed("method")),
        Err(httparse::Error::Token) => return Err(HeadError::Malformed("request target")),
        Err(httparse::Error::Version) => return Err(HeadError::Malformed("version")),
        Err(_) => return Err(HeadError::Malformed("header")),
    };
    if len > max_head {
        return Err(HeadError::TooLarge);
    }
    // Where each part is in `buf`, so that the frozen head can be sliced without copies.
    let base = buf.as_ptr() as usize;
    let offset = |part: &[u8]| part.as_ptr() as usize - base;
    let path = request.path.expect("httparse completed");
    if path.len() > MAX_URI_LEN {
        return Err(HeadError::UriTooLong);
    }
    let method = Method::from_bytes(request.method.expect("httparse completed").as_bytes())
        .map_err(|_| HeadError::Malformed("method"))?;
    let http11 = request.version == Some(1);
    let path_at = (offset(path.as_bytes()), path.len());
    // On the stack, not zeroed: where each header is, until the head is frozen.
    let mut spans: [MaybeUninit<Span>; MAX_HEADERS] = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let count = request.headers.len();
    for (span, h) in spans.iter_mut().zip(request.headers.iter()) {
        span.write((offset(h.name.as_bytes()), h.name.len(), offset(h.value), h.value.len()));
    }
    // SAFETY: the first `count` spans were written just above.
    let spans: &[Span] = unsafe { std::slice::from_raw_parts(spans.as_ptr().cast::<Span>(), count) };
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path_at.0..path_at.0 + path_at.1))
        .map_err(|_| HeadError::Malformed("request target"))?;
    frame(method, uri, http11, head, spans).map(Some)
}

/// Records where the head's fields are and decides its framing (see the module header).
fn frame(method: Method, uri: Uri, http11: bool, head: Bytes, spans: &[Span]) -> Result<Head, HeadError> {
    let mut headers = Lines::new(head, spans.len());
    let mut persistence = Persistence::new(http11);
    let (mut te, mut chunked, mut length, mut saw_length) = (false, false, None::<u64>, false);
    let mut expect_continue = false;
    for &(name_at, name_len, value_at, value_len) in spans {
        if name_len > MAX_NAME_LEN {
            // A name `http` refuses (`httparse` checked its characters: a token's).
            return Err(HeadError::Malformed("header name"));
        }
        let bytes = headers.bytes();
        let (name, value) = (
            &bytes[name_at..name_at + name_len],
            &bytes[value_at..value_at + value_len],
        );
        // Whether the lengths kept so far are dropped (a `Transfer-Encoding` after them).
        let drop_lengths = match framing_field(name) {
            Some(FramingField::TransferEncoding) => {
                if !http11 {
                    return Err(HeadError::Malformed("Transfer-Encoding in HTTP/1.0"));
                }
                te = true;
                chunked = last_coding_is_chunked(value);
                length.take().is_some()
            }
            Some(FramingField::ContentLength) => {
                saw_length = true;
                if te {
                    continue;
                }
                let len = digits(value).ok_or(HeadError::Malformed("Content-Length"))?;
                match length {
                    Some(previous) if previous != len => return Err(HeadError::Malformed("Content-Length")),
                    // The same length again: one.
                    Some(_) => continue,
                    None => length = Some(len),
                }
                false
            }
            Some(FramingField::Connection) => {
                persistence.connection(value);
                false
            }
            Some(FramingField::Expect) => {
                expect_continue = value.eq_ignore_ascii_case(b"100-continue");
                false
            }
            None => false,
        };
        if drop_lengths {
            headers.retain(|name, _| framing_field(name) != Some(FramingField::ContentLength));
        }
        headers.push((name_at, name_len), (value_at, value_len));
    }
    if te && !chunked {
        return Err(HeadError::Malformed("Transfer-Encoding not ending in chunked"));
    }
    if te && saw_length {
        // Both framings: chunked it is, and this connection serves nothing after it.
        persistence.close();
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(0) | None) => Framing::Empty,
        (false, Some(len)) => Framing::Length(len),
    };
    Ok(Head {
        method,
        uri,
        version: if http11 { Version::HTTP_11 } else { Version::HTTP_10 },
        headers,
        framing,
        keep_alive: persistence.keeps(),
        expect_continue,
    })
}

/// The fields that decide a request's framing and persistence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FramingField {
    TransferEncoding,
    ContentLength,
    Connection,
    Expect,
}

/// Which framing field `name` is, ignoring case (the length picks the one to compare).
fn framing_field(name: &[u8]) -> Option<FramingField> {
    let (field, text) = match name.len() {
        17 => (FramingField::TransferEncoding, "transfer-encoding"),
        14 => (FramingField::ContentLength, "content-length"),
        10 => (FramingField::Connection, "connection"),
        6 => (FramingField::Expect, "expect"),
        _ => return None,
    };
    name.eq_ignore_ascii_case(text.as_bytes()).then_some(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, HeadError> {
        parse(&mut BytesMut::from(text), 64 * 1024)
    }

    #[test]
    fn a_plain_post_with_a_length() {
        let mut buf =
            BytesMut::from("POST /ns/vm?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nce-id: 1\r\n\r\n{}NEXT");
        let h = parse(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri, "/ns/vm?x=1");
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        assert_eq!(h.headers.get("ce-id"), Some(&b"1"[..]));
        assert_eq!(&buf[..], b"{}NEXT", "the body and what follows stay");
    }

    #[test]
    fn an_incomplete_head_waits_until_its_limit() {
        assert!(head("POST / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        let long = format!("POST / HTTP/1.1\r\nX: {}\r\n", "a".repeat(100));
        assert_eq!(
            parse(&mut BytesMut::from(long.as_str()), 64).unwrap_err(),
            HeadError::TooLarge
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        let text = format!("POST / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(head(&text).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn framing_follows_rfc_9112_as_hyper_does() {
        let framing = |extra: &str| {
            head(&format!("POST / HTTP/1.1\r\n{extra}\r\n")).map(|h| h.map(|h| (h.framing, h.keep_alive)))
        };
        assert_eq!(framing("").unwrap(), Some((Framing::Empty, true)));
        assert_eq!(
            framing("Transfer-Encoding: gzip, chunked\r\n").unwrap(),
            Some((Framing::Chunked, true))
        );
        assert_eq!(
            framing("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n").unwrap(),
            Some((Framing::Chunked, false)),
            "both: chunked, and the connection closes"
        );
        assert_eq!(
            framing("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n").unwrap(),
            Some((Framing::Chunked, false))
        );
        assert_eq!(
            framing("Content-Length: 5\r\nContent-Length: 5\r\n").unwrap(),
            Some((Framing::Length(5), true))
        );
        for bad in [
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999\r\n",
        ] {
            assert!(matches!(framing(bad), Err(HeadError::Malformed(_))), "{bad:?}");
        }
        let te_in_10 = head("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(te_in_10, Err(HeadError::Malformed(_))));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let keep = |text: &str| head(text).unwrap().unwrap().keep_alive;
        assert!(!keep("POST / HTTP/1.0\r\n\r\n"));
        assert!(keep("POST / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!keep("POST / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!keep(
            "POST / HTTP/1.1\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn fields_stay_where_they_came_in_the_case_they_came() {
        let h = head("POST / HTTP/1.1\r\nCE-ID: 1\r\nContent-Length: 0\r\nce-source: /s\r\n\r\n")
            .unwrap()
            .unwrap();
        let fields: Vec<_> = h.headers.iter().collect();
        assert_eq!(
            fields,
            [
                (&b"CE-ID"[..], &b"1"[..]),
                (b"Content-Length", b"0"),
                (b"ce-source", b"/s")
            ]
        );
        // A length dropped for a later Transfer-Encoding is not passed on.
        let h = head("POST / HTTP/1.1\r\ncontent-length: 5\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        let names: Vec<_> = h.headers.iter().map(|(n, _)| n.to_vec()).collect();
        assert_eq!(names, [&b"X"[..], b"Transfer-Encoding"]);
        // Of several equal lengths, one.
        let h = head("POST / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.headers.len(), 1);
    }

    /// No header map is built any more, so nothing checks a name with `http`: every name
    /// `httparse` takes must be one `http` takes (else hyper would refuse the head where
    /// this parser passes it on).
    #[test]
    fn every_name_httparse_takes_is_one_http_takes() {
        for b in 0..=255u8 {
            let mut name = b"x-a".to_vec();
            name.insert(2, b);
            let mut text = b"POST / HTTP/1.1\r\n".to_vec();
            text.extend_from_slice(&name);
            text.extend_from_slice(b": 1\r\n\r\n");
            if let Ok(Some(h)) = parse(&mut BytesMut::from(&text[..]), 1024) {
                // (A `:` ends the name early: the name is what came before it.)
                for (name, value) in h.headers.iter() {
                    assert!(http::HeaderName::from_bytes(name).is_ok(), "byte {b:#x}");
                    assert!(http::HeaderValue::from_bytes(value).is_ok(), "byte {b:#x}");
                }
            }
        }
        let long = format!("POST / HTTP/1.1\r\n{}: 1\r\n\r\n", "a".repeat(MAX_NAME_LEN + 1));
        assert!(http::HeaderName::from_bytes("a".repeat(MAX_NAME_LEN + 1).as_bytes()).is_err());
        assert_eq!(
            parse(&mut BytesMut::from(long.as_str()), 1 << 20).unwrap_err(),
            HeadError::Malformed("header name")
        );
    }

    #[test]
    fn what_httparse_refuses_is_malformed() {
        for bad in [
            "POST / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "POST / HTTP/1.1\r\nX : a\r\n\r\n",
            "PO ST / HTTP/1.1\r\n\r\n",
            "POST / HTTP/2.0\r\n\r\n",
            "POST / HTTP/1.1\r\nX: a\0b\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Malformed(_))), "{bad:?}");
        }
        let long = format!("POST /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_URI_LEN + 1));
        assert_eq!(
            parse(&mut BytesMut::from(long.as_str()), 1 << 20).unwrap_err(),
            HeadError::UriTooLong
        );
    }
}
