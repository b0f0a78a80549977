//! Fuzzes the ingress's own HTTP/1.1 parsers (`server::h1`): request heads and chunked
//! bodies, pipelined, fed as a socket would deliver them. Never a panic, and the same
//! outcome whether the bytes come all at once or in pieces of any size (the first input
//! byte chooses the piece size and the head limit), and every header field passed on is
//! one `http` takes. Run: see docs/testing.md "Fuzzing".
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use vm_activator::server::h1::head::{self, Framing};
use vm_activator::server::h1::{ChunkedDecoder, ChunkedStep};

/// What a connection made of a byte stream: each request's head and body, then how it
/// ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    requests: Vec<(String, String, Framing, Vec<u8>)>,
    end: String,
}

fn run(input: &[u8], piece: usize, max_head: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut feed = |buf: &mut BytesMut| -> bool {
        if fed >= input.len() {
            return false;
        }
        let end = (fed + piece).min(input.len());
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        true
    };
    let mut requests = Vec::new();
    loop {
        // A head.
        let parsed = loop {
            match head::parse(&mut buf, max_head) {
                Ok(Some(h)) => break h,
                Ok(None) => {
                    if !feed(&mut buf) {
                        return Outcome { requests, end: "eof in head".into() };
                    }
                }
                Err(e) => return Outcome { requests, end: format!("head: {e}") },
            }
        };
        // Its body.
        let mut body = Vec::new();
        match parsed.framing {
            Framing::Empty => {}
            Framing::Length(len) => {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                while body.len() < len {
                    if buf.is_empty() && !feed(&mut buf) {
                        return Outcome { requests, end: "eof in body".into() };
                    }
                    let take = (len - body.len()).min(buf.len());
                    body.extend_from_slice(&buf.split_to(take));
                }
            }
            Framing::Chunked => {
                let mut decoder = ChunkedDecoder::default();
                loop {
                    match decoder.step(&mut buf) {
                        Ok(ChunkedStep::Data(data)) => body.extend_from_slice(&data),
                        Ok(ChunkedStep::End) => break,
                        Ok(ChunkedStep::NeedMore) => {
                            if !feed(&mut buf) {
                                return Outcome { requests, end: "eof in chunked body".into() };
                            }
                        }
                        Err(e) => return Outcome { requests, end: format!("chunked: {e}") },
                    }
                }
                assert!(decoder.is_done());
            }
        }
        assert!(parsed.headers.len() <= head::MAX_HEADERS);
        // No header map is built: every field passed on must be one a map would take
        // (hyper's server would refuse the head otherwise).
        for (name, value) in parsed.headers.iter() {
            assert!(http::HeaderName::from_bytes(name).is_ok(), "name {name:?}");
            assert!(http::HeaderValue::from_bytes(value).is_ok(), "value {value:?}");
        }
        requests.push((parsed.method.to_string(), parsed.uri.to_string(), parsed.framing, body));
        if !parsed.keep_alive {
            return Outcome { requests, end: "close".into() };
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let piece = usize::from(selector & 0x0f) + 1;
    let max_head = if selector & 0x10 == 0 { 64 * 1024 } else { 128 };
    let whole = run(input, input.len().max(1), max_head);
    let in_pieces = run(input, piece, max_head);
    // A head over the limit is caught sooner or later depending on the reads, as a
    // socket's; every other outcome must not depend on them.
    if !whole.end.contains("too large") && !in_pieces.end.contains("too large") {
        assert_eq!(whole, in_pieces, "pieces of {piece}");
    }
});
