//! Header names without a copy: `http` keeps its standard names as constants but copies
//! every other name it parses into an allocation of its own — four of them for the four
//! `ce-*` attributes every binary-mode CloudEvent carries. The names CloudEvents senders
//! (Knative's brokers and channels, the SDKs) and tracing put on every event are kept
//! here as `'static` names; a header with one of them costs no allocation.
//!
//! Pure: no I/O.

use http::header::HeaderName;

/// The names kept, lowercase (as `HeaderName` stores every name). A `static`: a `const`
/// array would be built (and dropped) at every use.
static KNOWN: [HeaderName; 14] = [
    HeaderName::from_static("ce-specversion"),
    HeaderName::from_static("ce-id"),
    HeaderName::from_static("ce-source"),
    HeaderName::from_static("ce-type"),
    HeaderName::from_static("ce-subject"),
    HeaderName::from_static("ce-time"),
    HeaderName::from_static("ce-dataschema"),
    HeaderName::from_static("ce-partitionkey"),
    HeaderName::from_static("ce-traceparent"),
    HeaderName::from_static("ce-knativearrivaltime"),
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("prefer"),
    HeaderName::from_static("x-request-id"),
];

/// `ce-specversion`, to look up by: a `&str` is parsed and lowercased again at every
/// lookup.
pub static CE_SPECVERSION: HeaderName = HeaderName::from_static("ce-specversion");

/// `ce-type`, to look up by (see [`CE_SPECVERSION`]).
pub static CE_TYPE: HeaderName = HeaderName::from_static("ce-type");

/// The longest name in `KNOWN`.
const LONGEST: usize = 21;

/// `bytes` as a header name: one of the kept names if it is one (in any case), else
/// what `HeaderName::from_bytes` makes of it (a standard name, or a copy).
pub fn header_name(bytes: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    // Only a name shaped like a kept one is lowercased and looked up: `ce-…`, `t…`,
    // `p…` or `x-…` (`Content-Type`, `Host`, `Date` go straight to `http`).
    let shaped = |bytes: &[u8]| match bytes[0].to_ascii_lowercase() {
        b'c' => bytes[2] == b'-',
        b't' | b'p' => true,
        b'x' => bytes[1] == b'-',
        _ => false,
    };
    if (5..=LONGEST).contains(&bytes.len()) && shaped(bytes) {
        let mut lower = [0u8; LONGEST];
        for (l, b) in lower.iter_mut().zip(bytes) {
            *l = b.to_ascii_lowercase();
        }
        // A match on the bytes: the compiler switches on the length first.
        let known = match &lower[..bytes.len()] {
            b"ce-specversion" => Some(0),
            b"ce-id" => Some(1),
            b"ce-source" => Some(2),
            b"ce-type" => Some(3),
            b"ce-subject" => Some(4),
            b"ce-time" => Some(5),
            b"ce-dataschema" => Some(6),
            b"ce-partitionkey" => Some(7),
            b"ce-traceparent" => Some(8),
            b"ce-knativearrivaltime" => Some(9),
            b"traceparent" => Some(10),
            b"tracestate" => Some(11),
            b"prefer" => Some(12),
            b"x-request-id" => Some(13),
            _ => None,
        };
        if let Some(index) = known {
            return Ok(KNOWN[index].clone());
        }
    }
    HeaderName::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_names_are_matched_in_any_case_and_the_rest_parsed() {
        assert_eq!(header_name(b"Ce-Id").unwrap(), "ce-id");
        assert_eq!(header_name(b"CE-SPECVERSION").unwrap(), "ce-specversion");
        assert_eq!(header_name(b"ce-knativearrivaltime").unwrap(), "ce-knativearrivaltime");
        assert_eq!(header_name(b"Content-Type").unwrap(), http::header::CONTENT_TYPE);
        assert_eq!(header_name(b"ce-myextension").unwrap(), "ce-myextension");
        assert_eq!(header_name(b"ce-ids").unwrap(), "ce-ids");
        assert_eq!(header_name(b"X-Request-ID").unwrap(), "x-request-id");
        assert_eq!(header_name(b"TraceParent").unwrap(), "traceparent");
        assert_eq!(header_name(b"Prefer").unwrap(), "prefer");
        assert_eq!(header_name(b"Content-Length").unwrap(), http::header::CONTENT_LENGTH);
        assert_eq!(header_name(b"cx-id").unwrap(), "cx-id");
        assert!(header_name(b"ce id").is_err());
        assert!(header_name(b"").is_err());
    }

    #[test]
    fn every_kept_name_is_found_as_itself() {
        assert_eq!(KNOWN.iter().map(|k| k.as_str().len()).max(), Some(LONGEST));
        for known in &KNOWN {
            assert_eq!(&header_name(known.as_str().as_bytes()).unwrap(), known);
            let upper = known.as_str().to_ascii_uppercase();
            assert_eq!(&header_name(upper.as_bytes()).unwrap(), known);
        }
    }
}
