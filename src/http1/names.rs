//! Header names without a copy: `http` keeps its standard names as constants but copies
//! every other name it parses into an allocation of its own — four of them for the four
//! `ce-*` attributes every binary-mode CloudEvent carries. The names CloudEvents senders
//! (Knative's brokers and channels, the SDKs) and tracing put on every event are kept
//! here as `'static` names; a header with one of them costs no allocation. The usual
//! standard names are found by the same one match (as `http`'s constants).
//!
//! Pure: no I/O.

use http::header::{self, HeaderName};

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

/// The standard names request and response heads usually carry, matched here with the
/// kept ones: `http` would lowercase and check them through a table and a second match.
/// A `static`, as `KNOWN`.
static STANDARD: [HeaderName; 18] = [
    header::HOST,
    header::USER_AGENT,
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::DATE,
    header::SERVER,
    header::CACHE_CONTROL,
    header::VARY,
];

/// `bytes` as a header name: one of the kept names or a usual standard one if it is one
/// (in any case), else what `HeaderName::from_bytes` makes of it (a standard name, or a
/// copy).
pub fn header_name(bytes: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    if (2..=LONGEST).contains(&bytes.len()) {
        let mut lower = [0u8; LONGEST];
        for (l, b) in lower.iter_mut().zip(bytes) {
            *l = b.to_ascii_lowercase();
        }
        // A match on the bytes: the compiler switches on the length first. Kept names
        // are indices into `KNOWN`, standard ones (a constant each) into `STANDARD`.
        enum Found {
            Kept(usize),
            Standard(usize),
        }
        use Found::{Kept, Standard};
        let found = match &lower[..bytes.len()] {
            b"ce-specversion" => Some(Kept(0)),
            b"ce-id" => Some(Kept(1)),
            b"ce-source" => Some(Kept(2)),
            b"ce-type" => Some(Kept(3)),
            b"ce-subject" => Some(Kept(4)),
            b"ce-time" => Some(Kept(5)),
            b"ce-dataschema" => Some(Kept(6)),
            b"ce-partitionkey" => Some(Kept(7)),
            b"ce-traceparent" => Some(Kept(8)),
            b"ce-knativearrivaltime" => Some(Kept(9)),
            b"traceparent" => Some(Kept(10)),
            b"tracestate" => Some(Kept(11)),
            b"prefer" => Some(Kept(12)),
            b"x-request-id" => Some(Kept(13)),
            b"host" => Some(Standard(0)),
            b"user-agent" => Some(Standard(1)),
            b"accept" => Some(Standard(2)),
            b"accept-encoding" => Some(Standard(3)),
            b"authorization" => Some(Standard(4)),
            b"content-type" => Some(Standard(5)),
            b"content-length" => Some(Standard(6)),
            b"content-encoding" => Some(Standard(7)),
            b"connection" => Some(Standard(8)),
            b"transfer-encoding" => Some(Standard(9)),
            b"expect" => Some(Standard(10)),
            b"te" => Some(Standard(11)),
            b"trailer" => Some(Standard(12)),
            b"upgrade" => Some(Standard(13)),
            b"date" => Some(Standard(14)),
            b"server" => Some(Standard(15)),
            b"cache-control" => Some(Standard(16)),
            b"vary" => Some(Standard(17)),
            _ => None,
        };
        match found {
            Some(Kept(index)) => return Ok(KNOWN[index].clone()),
            // A standard name is an enum value: nothing is copied or counted.
            Some(Standard(index)) => return Ok(STANDARD[index].clone()),
            None => {}
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
    fn every_usual_standard_name_is_found_as_its_constant() {
        for standard in &STANDARD {
            assert!(standard.as_str().len() <= LONGEST);
            assert_eq!(&header_name(standard.as_str().as_bytes()).unwrap(), standard);
            let upper = standard.as_str().to_ascii_uppercase();
            assert_eq!(&header_name(upper.as_bytes()).unwrap(), standard);
            // What `http` makes of it: the same standard name.
            assert_eq!(&HeaderName::from_bytes(upper.as_bytes()).unwrap(), standard);
        }
        // Names one byte off a matched one are parsed as what they are.
        assert_eq!(header_name(b"hosts").unwrap(), "hosts");
        assert_eq!(header_name(b"Content-Typ").unwrap(), "content-typ");
        assert!(header_name(b"ho st").is_err());
        assert!(header_name(b"h").is_ok());
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
