//! Header names without a copy: `http` keeps its standard names as constants but copies
//! every other name it parses into an allocation of its own — four of them for the four
//! `ce-*` attributes every binary-mode CloudEvent carries. The names CloudEvents senders
//! (Knative's brokers and channels, the SDKs) and tracing put on every event are kept
//! here as `'static` names; a header with one of them costs no allocation. The usual
//! standard names are found by the same lookup (as `http`'s constants). Used where a
//! header map is made: a guest's response head, and a traced request's fields (whose
//! `traceparent` is replaced); an HTTP/1.1 request's fields are otherwise read in place.
//!
//! Pure: no I/O.

use http::header::{self, HeaderName};

/// The names found without a copy, lowercase: first those kept as `'static` names
/// (CloudEvents attributes and tracing headers), then the usual standard names request
/// and response heads carry (a constant each in `http`, which would lowercase and check
/// them through a table and a second match). Their text is [`TEXT`], in the same order.
/// A `static`: a `const` array would be built (and dropped) at every use.
static NAMES: [HeaderName; COUNT] = [
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

/// How many names [`NAMES`] holds.
const COUNT: usize = 32;

/// The text of each of [`NAMES`] (`HeaderName::as_str` is not `const`; a test checks
/// that the two agree).
const TEXT: [&str; COUNT] = [
    "ce-specversion",
    "ce-id",
    "ce-source",
    "ce-type",
    "ce-subject",
    "ce-time",
    "ce-dataschema",
    "ce-partitionkey",
    "ce-traceparent",
    "ce-knativearrivaltime",
    "traceparent",
    "tracestate",
    "prefer",
    "x-request-id",
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "authorization",
    "content-type",
    "content-length",
    "content-encoding",
    "connection",
    "transfer-encoding",
    "expect",
    "te",
    "trailer",
    "upgrade",
    "date",
    "server",
    "cache-control",
    "vary",
];

/// The longest name in [`TEXT`].
const LONGEST: usize = 21;
/// A name is compared as this many 8-byte words (enough for [`LONGEST`] bytes).
const WORDS: usize = 3;

/// Where a name of `len` bytes whose first byte is `first` and second-to-last is
/// `near_end` (both with the case bit 0x20 set, which lowercases a letter) can only be
/// in [`NAMES`]: no two names share the three, and these factors spread them over
/// [`SLOTS`] without a collision (checked when the table is built, at compile time).
const fn slot(len: usize, first: u8, near_end: u8) -> usize {
    (len + 3 * first as usize + 15 * near_end as usize) & (SLOT_COUNT - 1)
}

/// How many slots [`SLOTS`] has (a power of two: [`slot`] masks with it).
const SLOT_COUNT: usize = 128;
/// A slot no name hashes to.
const NO_NAME: u8 = u8::MAX;

/// Each slot's index into [`NAMES`], or [`NO_NAME`].
static SLOTS: [u8; SLOT_COUNT] = {
    let mut slots = [NO_NAME; SLOT_COUNT];
    let mut i = 0;
    while i < COUNT {
        let text = TEXT[i].as_bytes();
        let at = slot(text.len(), text[0], text[text.len() - 2]);
        assert!(
            slots[at] == NO_NAME,
            "two names share a slot: change the factors of `slot`"
        );
        slots[at] = i as u8;
        i += 1;
    }
    slots
};

/// A name as three little-endian words of its lowercase bytes (zero past its end), and
/// per byte the bit its case may differ by: 0x20 for a letter, nothing for `-`.
#[derive(Clone, Copy)]
struct Words {
    lower: [u64; WORDS],
    case: [u64; WORDS],
}

/// [`Words`] of each of [`NAMES`].
static NAME_WORDS: [Words; COUNT] = {
    let mut all = [Words {
        lower: [0; WORDS],
        case: [0; WORDS],
    }; COUNT];
    let mut i = 0;
    while i < COUNT {
        let text = TEXT[i].as_bytes();
        assert!(text.len() <= LONGEST);
        let mut at = 0;
        while at < text.len() {
            let byte = text[at];
            assert!(
                byte.is_ascii_lowercase() || byte == b'-',
                "names are lowercase letters and '-'"
            );
            all[i].lower[at / 8] |= (byte as u64) << (8 * (at % 8));
            if byte.is_ascii_lowercase() {
                all[i].case[at / 8] |= 0x20 << (8 * (at % 8));
            }
            at += 1;
        }
        i += 1;
    }
    all
};

/// `bytes` as a header name: one of the names kept here (`NAMES`) if it is one (in any
/// case), else what `HeaderName::from_bytes` makes of it (a standard name, or a copy).
///
/// One of `NAMES` is found by its length, first and second-to-last byte (one slot to
/// look at) and then compared as three words, ignoring the case of letters only: a
/// byte that differs from a name's `-`, or from one of its letters by more than case,
/// is not that name, so what matches is exactly that name in some case.
pub fn header_name(bytes: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    let len = bytes.len();
    if (2..=LONGEST).contains(&len) {
        let index = SLOTS[slot(len, bytes[0] | 0x20, bytes[len - 2] | 0x20)];
        if index != NO_NAME && TEXT[index as usize].len() == len {
            let words = &NAME_WORDS[index as usize];
            let same = (0..WORDS).all(|w| word(bytes, w) | words.case[w] == words.lower[w]);
            if same {
                // A standard name is an enum value and a kept one a `'static` slice:
                // nothing is copied or counted.
                return Ok(NAMES[index as usize].clone());
            }
        }
    }
    HeaderName::from_bytes(bytes)
}

/// The `w`th 8-byte little-endian word of `bytes`, zero past its end — read in place,
/// without copying `bytes` into a padded buffer: a last partial word is the last eight
/// bytes shifted (when there are eight), else the few bytes gathered one by one.
#[inline(always)]
fn word(bytes: &[u8], w: usize) -> u64 {
    let (len, at) = (bytes.len(), 8 * w);
    let le = |eight: &[u8]| u64::from_le_bytes(eight.try_into().expect("eight bytes"));
    if at + 8 <= len {
        le(&bytes[at..at + 8])
    } else if at >= len {
        0
    } else if len >= 8 {
        le(&bytes[len - 8..]) >> (8 * (at + 8 - len))
    } else {
        bytes.iter().rev().fold(0, |word, &byte| word << 8 | u64::from(byte))
    }
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
    fn every_name_is_found_as_itself_in_any_case() {
        assert_eq!(TEXT.iter().map(|t| t.len()).max(), Some(LONGEST));
        for (name, text) in NAMES.iter().zip(TEXT) {
            assert_eq!(name.as_str(), text);
            assert_eq!(&header_name(text.as_bytes()).unwrap(), name);
            let upper = text.to_ascii_uppercase();
            assert_eq!(&header_name(upper.as_bytes()).unwrap(), name);
            // What `http` makes of it: the same name (a standard one is its constant).
            assert_eq!(&HeaderName::from_bytes(upper.as_bytes()).unwrap(), name);
        }
        // Names one byte off a found one are parsed as what they are.
        assert_eq!(header_name(b"hosts").unwrap(), "hosts");
        assert_eq!(header_name(b"Content-Typ").unwrap(), "content-typ");
        assert!(header_name(b"ho st").is_err());
        assert!(header_name(b"h").is_ok());
    }

    /// Every name with any one byte replaced by any other: the same answer as
    /// `HeaderName::from_bytes` — the word comparison matches a name only in some case
    /// of its letters (a `\r` where a name has `-` differs from it by the case bit).
    #[test]
    fn a_name_with_any_byte_changed_is_what_http_parses() {
        for text in TEXT {
            for at in 0..text.len() {
                for byte in 0..=255u8 {
                    let mut bytes = text.as_bytes().to_vec();
                    bytes[at] = byte;
                    let ours = header_name(&bytes);
                    let http = HeaderName::from_bytes(&bytes);
                    assert_eq!(ours.is_ok(), http.is_ok(), "{:?}", String::from_utf8_lossy(&bytes));
                    if let (Ok(ours), Ok(http)) = (ours, http) {
                        assert_eq!(ours, http, "{:?}", String::from_utf8_lossy(&bytes));
                    }
                }
            }
        }
        assert!(header_name(b"ce\rid").is_err());
    }
}
