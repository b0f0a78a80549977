//! HTTP/1.1 as the proxy speaks it to guests, on `httparse`. Long because: two fifths of
//! it are the tables of guest answers and request heads its tests hold it to, which need
//! the private pieces.
//!
//! A request head is written from the request's parts into a buffer the connection
//! keeps; a response head is parsed from the connection's buffer (its header values
//! sharing those bytes, no copies) with its body's framing decided by RFC 9112 §6.3 as
//! hyper's client decides it:
//!
//! - 1xx responses other than 101 are skipped (the final response follows); a 101 is
//!   refused (we never ask to switch protocols, RFC 9110 §15.2.2);
//! - the answer to a HEAD request, a 204 and a 304 have no body;
//! - `Transfer-Encoding` in an HTTP/1.0 response is refused; one whose last coding is
//!   `chunked` frames the body (any `Content-Length` is dropped and the connection is not
//!   kept), any other reads the body until the guest closes;
//! - `Content-Length` values (several lines, or a comma-separated list) must all be the
//!   same run of digits, else the response is refused;
//! - neither: the body is read until the guest closes;
//! - HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 closes it unless
//!   `Connection: keep-alive`.
//!
//! `differential.rs` (tests) sends one table of guest answers to this client and to
//! hyper's and compares what each makes of them.
//!
//! Pure: no I/O. Owns: the bytes on the guest connection, nothing of its timing.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};

use crate::http1::fields::{last_coding_is_chunked, Persistence};
use crate::http1::lines::ReadFields;
use crate::http1::{maps, names, MAX_HEADERS};

/// The largest response head taken from a guest (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;

/// How a response's body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the guest closes the connection.
    UntilClose,
}

/// A guest's final response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status (never 1xx).
    pub status: StatusCode,
    /// HTTP/1.1 or HTTP/1.0.
    pub version: Version,
    /// The headers, values sharing the head's bytes.
    pub headers: HeaderMap,
    /// How its body is framed.
    pub framing: Framing,
    /// Whether the connection can take another request after this exchange.
    pub keep_alive: bool,
}

/// Why a guest's response cannot be read: the exchange fails (→ 502) and the connection
/// closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The response head is malformed.
    #[error("malformed response from the guest: {0}")]
    Malformed(&'static str),
    /// The response head is larger than [`MAX_HEAD`] or has more than
    /// [`MAX_HEADERS`] headers.
    #[error("the guest's response head is larger than 64 KiB or has more than 100 headers")]
    TooLarge,
    /// A 101 to a request that asked for no upgrade.
    #[error("the guest switched protocols unasked (101)")]
    Upgrade,
}

/// Writes the head of a request to `out`: request line, `host` (already a whole line),
/// the header fields but `Host` and `Content-Length` (names as the sender wrote them, in
/// its order), and the body's length when it has one (as hyper's client: an empty body
/// gets no `Content-Length`).
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    uri: &http::Uri,
    host_line: &[u8],
    headers: &impl ReadFields,
    body_len: usize,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out.extend_from_slice(host_line);
    for (name, value) in headers.fields() {
        if name.eq_ignore_ascii_case(b"host") || name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if body_len > 0 {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `host: <endpoint>` and its line end, made once per connection.
pub fn host_line(endpoint: std::net::SocketAddr) -> Box<[u8]> {
    format!("host: {endpoint}\r\n").into_bytes().into_boxed_slice()
}

/// Where a header's name and value are in the head: (name at, name length, value at,
/// value length).
type Span = (usize, usize, usize, usize);

/// Parses the final response head at the start of `buf`, skipping interim (1xx) ones:
/// `Ok(None)` while it is incomplete, else the head with its bytes split off `buf` (what
/// follows is the body's start). `head_request`: the request was a HEAD.
pub fn parse_response(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, WireError> {
    loop {
        let mut storage: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
            [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed =
            httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut storage);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(WireError::TooLarge),
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(WireError::TooLarge),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(WireError::TooLarge),
            Err(httparse::Error::Version) => return Err(WireError::Malformed("version")),
            Err(httparse::Error::Status) => return Err(WireError::Malformed("status")),
            Err(_) => return Err(WireError::Malformed("header")),
        };
        let code = response.code.expect("httparse completed");
        let status = StatusCode::from_u16(code).map_err(|_| WireError::Malformed("status"))?;
        let http11 = response.version == Some(1);
        let base = buf.as_ptr() as usize;
        let offset = |part: &[u8]| part.as_ptr() as usize - base;
        // On the stack, not zeroed: where each header is, until the head is frozen.
        let mut spans: [MaybeUninit<Span>; MAX_HEADERS] = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let count = response.headers.len();
        for (span, h) in spans.iter_mut().zip(response.headers.iter()) {
            span.write((offset(h.name.as_bytes()), h.name.len(), offset(h.value), h.value.len()));
        }
        // SAFETY: the first `count` spans were written just above.
        let spans: &[Span] = unsafe { std::slice::from_raw_parts(spans.as_ptr().cast::<Span>(), count) };
        match code {
            101 => return Err(WireError::Upgrade),
            100..=199 => {
                // An interim answer: dropped, the final one follows.
                let _ = buf.split_to(len);
                continue;
            }
            _ => {}
        }
        let head = buf.split_to(len).freeze();
        return frame(status, http11, head_request, &head, spans).map(Some);
    }
}

/// Builds the head's headers and decides its body's framing (see the module header).
fn frame(
    status: StatusCode,
    http11: bool,
    head_request: bool,
    head: &Bytes,
    spans: &[Span],
) -> Result<ResponseHead, WireError> {
    let mut headers = maps::take(spans.len());
    let mut persistence = Persistence::new(http11);
    let (mut te, mut chunked) = (false, false);
    let mut length: Option<u64> = None;
    let mut bad_length = false;
    for &(name_at, name_len, value_at, value_len) in spans {
        let name =
            names::header_name(&head[name_at..name_at + name_len]).map_err(|_| WireError::Malformed("header name"))?;
        // SAFETY: as in the request head's parser (`server::h1::head`): `httparse` took
        // the value only if every byte is one `HeaderValue` allows.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(value_at..value_at + value_len)) };
        match name {
            header::TRANSFER_ENCODING => {
                te = true;
                // hyper reads every Transfer-Encoding line's last coding; the last line
                // decides.
                chunked = last_coding_is_chunked(value.as_bytes());
            }
            header::CONTENT_LENGTH => {
                for part in value.as_bytes().split(|&b| b == b',') {
                    match crate::http1::fields::digits(part.trim_ascii()) {
                        Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                        _ => bad_length = true,
                    }
                }
            }
            header::CONNECTION => {
                persistence.connection(value.as_bytes());
            }
            _ => {}
        }
        headers.append(name, value);
    }
    let no_body = head_request || matches!(status.as_u16(), 204 | 304);
    let framing = if no_body {
        Framing::Empty
    } else if te {
        if !http11 {
            return Err(WireError::Malformed("Transfer-Encoding in HTTP/1.0"));
        }
        if headers.remove(header::CONTENT_LENGTH).is_some() {
            // Both framings: the body is read as chunked, and nothing after it is trusted.
            persistence.close();
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if bad_length {
        return Err(WireError::Malformed("Content-Length"));
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(len) => Framing::Length(len),
            None => Framing::UntilClose,
        }
    };
    if framing == Framing::UntilClose {
        persistence.close();
    }
    Ok(ResponseHead {
        status,
        version: if http11 { Version::HTTP_11 } else { Version::HTTP_10 },
        headers,
        framing,
        keep_alive: persistence.keeps(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, head_request: bool) -> Result<Option<ResponseHead>, WireError> {
        parse_response(&mut BytesMut::from(text), head_request)
    }

    /// A head's framing and whether the connection is kept.
    type Read = Result<(Framing, bool), WireError>;

    fn framing(text: &str) -> Read {
        let head = parse(text, false)?.expect("complete");
        Ok((head.framing, head.keep_alive))
    }

    #[test]
    fn the_request_head_is_what_hyper_would_write() {
        let mut headers = HeaderMap::new();
        headers.insert("ce-id", HeaderValue::from_static("1"));
        headers.insert(header::HOST, HeaderValue::from_static("sender.example"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        let mut out = Vec::new();
        let host = host_line("10.0.0.5:8080".parse().unwrap());
        let uri = http::Uri::from_static("/events?x=1");
        encode_request(&mut out, &Method::POST, &uri, &host, &headers, 2);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "POST /events?x=1 HTTP/1.1\r\nhost: 10.0.0.5:8080\r\nce-id: 1\r\ncontent-length: 2\r\n\r\n"
        );
        encode_request(
            &mut out,
            &Method::GET,
            &http::Uri::from_static("http://a/"),
            &host,
            &HeaderMap::new(),
            0,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: 10.0.0.5:8080\r\n\r\n"
        );
    }

    #[test]
    fn fields_read_in_place_go_out_as_the_sender_wrote_them() {
        let mut buf = BytesMut::from(
            "POST /ns/vm HTTP/1.1\r\nHOST: sender\r\nCE-Id: 1\r\nContent-length: 2\r\nX-Two: a\r\nx-two: b\r\n\r\n",
        );
        let head = crate::server::h1::head::parse(&mut buf, 1024).unwrap().unwrap();
        let fields = crate::http1::lines::Fields::Lines(head.headers);
        let mut out = Vec::new();
        let host = host_line("10.0.0.5:8080".parse().unwrap());
        encode_request(
            &mut out,
            &Method::POST,
            &http::Uri::from_static("/e"),
            &host,
            &fields,
            2,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /e HTTP/1.1\r\nhost: 10.0.0.5:8080\r\nCE-Id: 1\r\nX-Two: a\r\nx-two: b\r\ncontent-length: 2\r\n\r\n",
            "the sender's Host and Content-Length, in any case, are replaced"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        let table: &[(&str, Read)] = &[
            ("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", Ok((Length(5), true))),
            ("HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n", Ok((Empty, true))),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\nContent-Length: 5\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                Err(WireError::Malformed("Content-Length")),
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
                Err(WireError::Malformed("Content-Length")),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Ok((Chunked, true)),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Ok((UntilClose, false)),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                Ok((Chunked, false)),
            ),
            (
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Err(WireError::Malformed("Transfer-Encoding in HTTP/1.0")),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Ok((UntilClose, false))),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                Ok((Empty, true)),
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", Ok((Empty, true))),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Ok((Length(1), false)),
            ),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                Ok((Length(1), false)),
            ),
            ("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", Ok((Length(1), false))),
            (
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                Ok((Length(1), true)),
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
                Err(WireError::Upgrade),
            ),
            (
                "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
                Err(WireError::Malformed("header")),
            ),
            (
                "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
                Err(WireError::Malformed("header")),
            ),
            ("HTTP/2 200 OK\r\n\r\n", Err(WireError::Malformed("version"))),
            ("HTTP/1.1 20 OK\r\n\r\n", Err(WireError::Malformed("status"))),
        ];
        for (text, expected) in table {
            assert_eq!(&framing(text), expected, "{text:?}");
        }
    }

    #[test]
    fn interim_answers_are_skipped_and_head_answers_have_no_body() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        );
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(!head.headers.contains_key("link"));
        assert_eq!(&buf[..], b"ok", "the body's start stays");
        let head = parse("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Empty, true));
        // Only an interim answer so far: incomplete.
        assert!(parse("HTTP/1.1 100 Continue\r\n\r\n", false).unwrap().is_none());
    }

    #[test]
    fn heads_are_bounded() {
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-le", false).unwrap().is_none());
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(parse(&long, false).unwrap_err(), WireError::TooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x{i}: 1\r\n")).collect();
        assert_eq!(
            parse(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false).unwrap_err(),
            WireError::TooLarge
        );
    }
}
