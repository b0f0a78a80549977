//! One table of guest answers — well-formed and not — sent to our client (`Proxy::send`)
//! and to hyper's (`client::conn::http1`), each answer from a real socket: what each
//! makes of it must agree (status, headers once hop-by-hop ones are stripped, body; or
//! both fail). The rows where we differ on purpose are listed apart, with why.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// What a client made of an answer: status, headers, body — or that it failed.
type Outcome = Result<(StatusCode, HeaderMap, Bytes), ()>;

/// After the answer: the guest closes its side, or keeps the connection open until the
/// client closes it (a client that waits for the close hangs, and fails the row).
#[derive(Clone, Copy, PartialEq)]
enum Then {
    Close,
    KeepOpen,
}

/// A guest on loopback that reads one request (head and `Content-Length` body) from
/// its first connection and writes `answer`.
async fn guest(answer: &'static [u8], then: Then) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                if seen.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let _ = stream.write_all(answer).await;
        match then {
            Then::Close => drop(stream),
            Then::KeepOpen => {
                let _ = stream.read(&mut buf).await;
            }
        }
    });
    addr
}

fn request(method: &http::Method) -> (http::request::Parts, Bytes) {
    let (parts, ()) = Request::builder()
        .method(method.clone())
        .uri("/events")
        .header("ce-id", "1")
        .body(())
        .unwrap()
        .into_parts();
    (parts, Bytes::from_static(b"{}"))
}

async fn ours(method: &http::Method, answer: &'static [u8], then: Then) -> Outcome {
    let endpoint = guest(answer, then).await;
    let proxy = Proxy::new(&ProxyConfig::default());
    let (parts, body) = request(method);
    let request = Proxy::prepare(
        parts.method,
        http::Uri::from_static("/events"),
        parts.headers.into(),
        body,
    );
    let response = proxy.send_within_5s(endpoint, &request).await.map_err(|_| ())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|_| ())?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

async fn hypers(method: &http::Method, answer: &'static [u8], then: Then) -> Outcome {
    let endpoint = guest(answer, then).await;
    let stream = tokio::net::TcpStream::connect(endpoint).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut parts, body) = request(method);
    parts
        .headers
        .insert(header::HOST, endpoint.to_string().parse().unwrap());
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(|_| ())?;
    let (mut parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|_| ())?.to_bytes();
    strip_hop_by_hop(&mut parts.headers);
    Ok((parts.status, parts.headers, body))
}

/// Both clients on one answer, each bounded in time (a hang fails the row).
async fn both(method: &http::Method, answer: &'static [u8], then: Then) -> (Outcome, Outcome) {
    let limit = Duration::from_secs(10);
    let ours = tokio::time::timeout(limit, ours(method, answer, then))
        .await
        .expect("ours answers in time");
    let hypers = tokio::time::timeout(limit, hypers(method, answer, then))
        .await
        .expect("hyper answers in time");
    (ours, hypers)
}

#[tokio::test]
async fn every_answer_is_read_as_hyper_reads_it() {
    use Then::*;
    let post = http::Method::POST;
    let head = http::Method::HEAD;
    let table: &[(&str, &http::Method, &'static [u8], Then)] = &[
        (
            "length",
            &post,
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
            KeepOpen,
        ),
        (
            "empty length",
            &post,
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n",
            KeepOpen,
        ),
        (
            "chunked, extensions, trailers",
            &post,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n1\r\n!\r\n0\r\nx-t: 1\r\n\r\n",
            KeepOpen,
        ),
        ("until close", &post, b"HTTP/1.1 200 OK\r\n\r\nuntil the end", Close),
        ("HTTP/1.0 until close", &post, b"HTTP/1.0 200 OK\r\n\r\nold", Close),
        (
            "HTTP/1.0 keep-alive",
            &post,
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "connection close",
            &post,
            b"HTTP/1.1 200 OK\r\nconnection: close, x-a\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok",
            Close,
        ),
        (
            "204 ignores its length",
            &post,
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            KeepOpen,
        ),
        ("304", &post, b"HTTP/1.1 304 Not Modified\r\n\r\n", KeepOpen),
        ("HEAD", &head, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", KeepOpen),
        (
            "100 then 202",
            &post,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "103 then 200",
            &post,
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "equal lengths",
            &post,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "differing lengths",
            &post,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
            KeepOpen,
        ),
        (
            "signed length",
            &post,
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "length not a number",
            &post,
            b"HTTP/1.1 200 OK\r\ncontent-length: two\r\n\r\nok",
            KeepOpen,
        ),
        (
            "not chunked: until close",
            &post,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzipped",
            Close,
        ),
        (
            "chunked in HTTP/1.0",
            &post,
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            Close,
        ),
        (
            "obs-fold",
            &post,
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n 2\r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "space before colon",
            &post,
            b"HTTP/1.1 200 OK\r\nx-a : 1\r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        ("bare LF", &post, b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok", KeepOpen),
        (
            "obs-text value",
            &post,
            b"HTTP/1.1 200 OK\r\nx-a: caf\xc3\xa9\r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "empty reason",
            &post,
            b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nok",
            KeepOpen,
        ),
        (
            "bad chunk size",
            &post,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
            Close,
        ),
        (
            "chunk without CR LF",
            &post,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokX0\r\n\r\n",
            Close,
        ),
        (
            "truncated length",
            &post,
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            Close,
        ),
        (
            "truncated chunked",
            &post,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            Close,
        ),
        ("truncated head", &post, b"HTTP/1.1 200 OK\r\ncontent-le", Close),
        ("no answer", &post, b"", Close),
        ("garbage", &post, b"hello there\r\n\r\n", Close),
        (
            "four-digit status",
            &post,
            b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n",
            Close,
        ),
        (
            "HTTP/2 status line",
            &post,
            b"HTTP/2 200 OK\r\ncontent-length: 0\r\n\r\n",
            Close,
        ),
        (
            "HTTP/1.2",
            &post,
            b"HTTP/1.2 200 OK\r\ncontent-length: 0\r\n\r\n",
            Close,
        ),
    ];
    let mut disagreements = Vec::new();
    for &(name, method, answer, then) in table {
        let (ours, hypers) = both(method, answer, then).await;
        let agree = match (&ours, &hypers) {
            (Ok(a), Ok(b)) => a == b,
            (Err(()), Err(())) => true,
            _ => false,
        };
        if !agree {
            disagreements.push(format!("{name}: ours {ours:?}, hyper's {hypers:?}"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

/// Where we differ from hyper on purpose.
#[tokio::test]
async fn the_deliberate_differences() {
    let post = http::Method::POST;
    // A 101 to a request that asked for no upgrade (RFC 9110 §15.2.2 forbids it): hyper
    // hands it on as a response; we refuse it (the sender gets 502, not a 101 it cannot
    // use).
    let answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n";
    let (ours, hypers) = both(&post, answer, Then::KeepOpen).await;
    assert!(ours.is_err());
    assert_eq!(hypers.unwrap().0, StatusCode::SWITCHING_PROTOCOLS);
    // Both framings: both read the body as chunked; we drop the `Content-Length` (RFC 9112
    // §6.3: a proxy must remove it before forwarding, as hyper 1.13 does), hyper 1.12
    // hands it on.
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
    let (ours, hypers) = both(&post, answer, Then::Close).await;
    let (ours, hypers) = (ours.unwrap(), hypers.unwrap());
    assert_eq!((ours.0, &ours.2[..]), (hypers.0, &hypers.2[..]));
    assert!(!ours.1.contains_key(header::CONTENT_LENGTH));
    // A head over 64 KiB: hyper reads up to ~400 KiB; we stop at 64 KiB.
    let big: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
            "a".repeat(70_000)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let (ours, hypers) = both(&post, big, Then::KeepOpen).await;
    assert!(ours.is_err());
    assert!(hypers.is_ok());
}
