//! The ingress's own HTTP/1.1 against hyper's server, row by row: the same ingress
//! service (over the fake backend) served by both — hyper's configured as the ingress
//! listener was before (`header_read_timeout`, a 64 KiB head) and ours — each row sent
//! as raw bytes to both, and the answers compared: the status lines in order, and whether
//! the server closed the connection. Every request-smuggling row is refused (or framed)
//! exactly as hyper refuses (or frames) it.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vm_activator::backend::fake::{FakeBackend, FakeOptions};
use vm_activator::config::Config;
use vm_activator::server::{self, h1};

const EVENT_HEADERS: &str = "ce-specversion: 1.0\r\nce-id: e-1\r\nce-source: /t\r\nce-type: t\r\n";

/// The two servers of one ingress service.
struct Servers {
    hyper: SocketAddr,
    ours: SocketAddr,
    _backend: Arc<FakeBackend>,
}

async fn servers() -> Servers {
    let backend = FakeBackend::new([(support::demo(), support::policy())], FakeOptions::default());
    let config = Config::for_tests();
    let app = server::app(&config, backend.clone()).await.expect("app");
    tokio::spawn(app.activator.clone().run_catalog_sync());
    let limits = config.ingress.clone();
    let hyper_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ours_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (hyper, ours) = (
        hyper_listener.local_addr().unwrap(),
        ours_listener.local_addr().unwrap(),
    );
    let service = app.ingress.clone();
    let (read_timeout, max_head) = (limits.header_read_timeout, limits.max_header_bytes);
    tokio::spawn(async move {
        // As the ingress listener served before: hyper_util's auto builder, these limits.
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            .max_buf_size(max_head.max(8192));
        loop {
            let (stream, _) = hyper_listener.accept().await.unwrap();
            let connection = builder
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()))
                .into_owned();
            tokio::spawn(connection);
        }
    });
    let service = app.ingress;
    let h1_limits = h1::Limits {
        header_read_timeout: read_timeout,
        max_head,
    };
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _stop_tx;
        loop {
            let (stream, _) = ours_listener.accept().await.unwrap();
            tokio::spawn(h1::serve_connection(stream, service.clone(), h1_limits, stop.clone()));
        }
    });
    Servers {
        hyper,
        ours,
        _backend: backend,
    }
}

/// What a server answered to `bytes`: its status lines in order, and whether it closed
/// the connection (an answer not finished within a second counts as the server waiting).
async fn answer(addr: SocketAddr, bytes: &[u8]) -> (Vec<String>, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(Duration::from_millis(1000), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let text = String::from_utf8_lossy(&received);
    let statuses = text
        .split("\r\n")
        .filter(|line| line.starts_with("HTTP/1."))
        .map(|line| line.trim().to_string())
        .collect();
    (statuses, closed)
}

fn event(extra_headers: &str, body: &str) -> String {
    format!("POST /default/demo HTTP/1.1\r\nHost: a\r\n{EVENT_HEADERS}{extra_headers}\r\n{body}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_is_answered_as_hyper_answers_it() {
    let s = servers().await;
    let long = "a".repeat(70 * 1024);
    let many: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
    let rows: Vec<(&str, String)> = vec![
        ("a valid event", event("Content-Length: 2\r\n", "{}")),
        ("a chunked event", event("Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\n\r\n")),
        (
            "chunked with extensions and a trailer",
            event("Transfer-Encoding: chunked\r\n", "2;a=b\r\n{}\r\n0\r\nx-t: 1\r\n\r\n"),
        ),
        (
            "Content-Length and Transfer-Encoding: chunked wins, the connection closes",
            event(
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                "2\r\n{}\r\n0\r\n\r\nPOST /default/demo HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            ),
        ),
        (
            "Transfer-Encoding then Content-Length",
            event("Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", "2\r\n{}\r\n0\r\n\r\n"),
        ),
        ("two equal Content-Lengths", event("Content-Length: 2\r\nContent-Length: 2\r\n", "{}")),
        ("two different Content-Lengths", event("Content-Length: 2\r\nContent-Length: 3\r\n", "{}x")),
        ("a Content-Length with a sign", event("Content-Length: +2\r\n", "{}")),
        ("a Content-Length list", event("Content-Length: 2, 2\r\n", "{}")),
        ("a Content-Length that overflows", event("Content-Length: 99999999999999999999\r\n", "{}")),
        ("Transfer-Encoding not ending in chunked", event("Transfer-Encoding: chunked, gzip\r\n", "2\r\n{}\r\n0\r\n\r\n")),
        ("Transfer-Encoding gzip", event("Transfer-Encoding: gzip\r\n", "{}")),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!("POST /default/demo HTTP/1.0\r\n{EVENT_HEADERS}Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"),
        ),
        ("a space before the colon", event("Transfer-Encoding : chunked\r\n", "2\r\n{}\r\n0\r\n\r\n")),
        ("obs-fold", event("X-Folded: a\r\n b\r\nContent-Length: 2\r\n", "{}")),
        (
            "bare LF line endings",
            format!("POST /default/demo HTTP/1.1\nHost: a\n{}Content-Length: 2\n\n{{}}", EVENT_HEADERS.replace("\r\n", "\n")),
        ),
        ("a NUL in a header value", event("X-Nul: a\0b\r\nContent-Length: 2\r\n", "{}")),
        ("a bad chunk size", event("Transfer-Encoding: chunked\r\n", "g\r\n{}\r\n0\r\n\r\n")),
        ("a negative chunk size", event("Transfer-Encoding: chunked\r\n", "-2\r\n{}\r\n0\r\n\r\n")),
        ("an overflowing chunk size", event("Transfer-Encoding: chunked\r\n", "fffffffffffffffffff\r\n{}\r\n0\r\n\r\n")),
        ("a chunk size line ending in bare LF", event("Transfer-Encoding: chunked\r\n", "2\n{}\r\n0\r\n\r\n")),
        ("a chunk extension with a bare LF", event("Transfer-Encoding: chunked\r\n", "2;a\nb\r\n{}\r\n0\r\n\r\n")),
        ("chunk data not followed by CR LF", event("Transfer-Encoding: chunked\r\n", "2\r\n{}x0\r\n\r\n")),
        ("a malformed trailer", event("Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\nnot a header\r\n\r\n")),
        ("an oversize request line", format!("POST /default/demo?{long} HTTP/1.1\r\nContent-Length: 0\r\n\r\n")),
        ("oversize headers", event(&format!("X-Long: {long}\r\nContent-Length: 2\r\n"), "{}")),
        ("too many headers", event(&format!("{many}Content-Length: 2\r\n"), "{}")),
        ("a bad method token", "PO(ST /default/demo HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_string()),
        ("a bad version", "POST /default/demo HTTP/1.2\r\nContent-Length: 0\r\n\r\n".to_string()),
        (
            "two pipelined events",
            format!(
                "{}{}",
                event("Content-Length: 2\r\n", "{}"),
                event("Content-Length: 2\r\n", "{}").replace("e-1", "e-2")
            ),
        ),
        ("Expect: 100-continue", event("Content-Length: 2\r\nExpect: 100-continue\r\n", "{}")),
        (
            "HTTP/1.0 without keep-alive",
            format!("POST /default/demo HTTP/1.0\r\n{EVENT_HEADERS}Content-Length: 2\r\n\r\n{{}}"),
        ),
        ("Connection: close", event("Content-Length: 2\r\nConnection: close\r\n", "{}")),
        ("a body shorter than its length", event("Content-Length: 10\r\nConnection: close\r\n", "{}")),
        ("an invalid CloudEvent", event("Content-Length: 2\r\n", "{}").replace("ce-id: e-1\r\n", "")),
        ("a GET", "GET /default/demo HTTP/1.1\r\nHost: a\r\n\r\n".to_string()),
    ];
    let mut differ = Vec::new();
    for (name, request) in &rows {
        let (hyper, ours) = tokio::join!(answer(s.hyper, request.as_bytes()), answer(s.ours, request.as_bytes()));
        eprintln!("{name}: hyper {hyper:?}, ours {ours:?}");
        if hyper != ours {
            differ.push(format!("{name}: hyper {hyper:?}, ours {ours:?}"));
        }
    }
    assert!(differ.is_empty(), "answered differently:\n{}", differ.join("\n"));
}

/// A sender still writing a body the ingress refused (413, over `max_body_bytes`) reads
/// the answer: the connection lingers — reads and discards what still comes — before it
/// closes, instead of closing with unread bytes, which makes the kernel reset the
/// connection under the sender's writes (`BrokenPipe` before it reads the 413).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_still_writing_a_refused_body_reads_the_413() {
    let s = servers().await;
    let body_len = 2 * 1024 * 1024;
    for round in 0..3 {
        let mut stream = TcpStream::connect(s.ours).await.unwrap();
        let head = event(&format!("Content-Length: {body_len}\r\n"), "");
        stream.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let (mut read, mut write) = stream.into_split();
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            let _ = read.read_to_end(&mut received).await;
            String::from_utf8_lossy(&received).into_owned()
        });
        // The first part, then a pause long enough for the answer to be written and the
        // connection to be closed, then the rest.
        let mut sent = 0;
        while sent < body_len / 4 {
            write.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        while sent < body_len {
            write
                .write_all(&chunk)
                .await
                .unwrap_or_else(|e| panic!("round {round}: writing the body after the answer: {e}"));
            sent += chunk.len();
        }
        write.shutdown().await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the connection closes")
            .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "round {round}: the sender reads the 413, got {answer:?}"
        );
    }
}
