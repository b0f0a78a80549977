//! Fuzzes CloudEvents validation (binary, structured and batch mode) and the ingress's
//! percent-decoding: never a panic, and every accepted event has what the contract
//! requires. Run: see README "Security".
#![no_main]

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use vm_activator::ingress::cloudevent::{percent_decode, validate, Mode};

const CONTENT_TYPES: [&str; 4] = [
    "application/cloudevents+json",
    "application/cloudevents-batch+json; charset=utf-8",
    "application/json",
    "text/plain",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // Input: "name: value" lines, a blank line, then the body.
    let split = rest.windows(2).position(|w| w == b"\n\n").unwrap_or(rest.len());
    let (head, body) = rest.split_at(split);
    let body = body.get(2..).unwrap_or(&[]);
    let mut headers = HeaderMap::new();
    if selector & 1 == 1 {
        let content_type = CONTENT_TYPES[usize::from(selector >> 1) % CONTENT_TYPES.len()];
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value.trim_ascii())) {
            let _ = percent_decode(value.as_bytes());
            headers.append(name, value);
        }
    }
    if let Ok(envelope) = validate(&headers, Bytes::copy_from_slice(body)) {
        assert_eq!(envelope.body.as_ref(), body, "the body is forwarded untouched");
        match envelope.mode {
            Mode::Binary => assert!(
                headers.get("ce-id").is_some_and(|id| !id.is_empty()),
                "accepted without an id"
            ),
            Mode::Structured | Mode::Batch(1..) => {
                assert!(envelope.id().is_some_and(|id| !id.is_empty()), "accepted without an id")
            }
            Mode::Batch(0) => assert!(envelope.id().is_none()),
        }
    }
});
