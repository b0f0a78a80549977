//! CloudEvents validation for the HTTP protocol binding (CloudEvents 1.0): binary
//! mode (attributes in `ce-` headers, percent-decoded), structured mode
//! (`application/cloudevents+json`) and batch mode (`application/cloudevents-batch+json`,
//! validated as a whole). The sender's bytes are forwarded untouched: validation never
//! re-serialises the event.
//!
//! This file has the envelope, the errors and the dispatch by content type;
//! `binary.rs` binary mode and percent-decoding, `structured.rs` structured and batch
//! mode.
//!
//! Owns: what counts as a valid event and the error that names the attribute.
//! Must not import the activator, lifecycle, backend or axum (it takes a request's header
//! fields, `http1::lines`, only).

mod binary;
mod structured;

use bytes::Bytes;

use crate::http1::lines::{text, ReadFields};

pub use binary::percent_decode;
use binary::validate_binary;
use structured::{validate_batch, validate_structured};

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";
const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];

/// How the event was carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Attributes in `ce-` headers, data in the body.
    Binary,
    /// The whole event as a JSON object in the body.
    Structured,
    /// A JSON array of structured events; holds their count.
    Batch(usize),
}

/// A validated event (or batch); the body is the sender's, byte for byte.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The mode.
    pub mode: Mode,
    /// The attributes read from the body (structured mode, or a non-empty batch). Binary
    /// mode leaves them in the `ce-*` headers (validated, not copied). Boxed: an envelope
    /// is part of every held event's state, and binary mode, the usual one, has none.
    pub from_body: Option<Box<BodyAttributes>>,
    /// The body as received.
    pub body: Bytes,
}

/// The attributes an envelope read from its body.
#[derive(Clone, Debug, Default)]
pub struct BodyAttributes {
    /// The event's `id` (a batch's first event's).
    pub id: Option<String>,
    /// The event's `type` (structured mode).
    pub kind: Option<String>,
    /// The event's `source` (structured mode).
    pub source: Option<String>,
}

impl Envelope {
    /// The `id` read from the body (structured mode; a non-empty batch's first event's).
    pub fn id(&self) -> Option<&str> {
        self.attribute(|a| a.id.as_deref())
    }

    fn attribute<'a>(&'a self, get: impl Fn(&'a BodyAttributes) -> Option<&'a str>) -> Option<&'a str> {
        self.from_body.as_deref().and_then(get)
    }

    /// The event's `id` and `source` (for a batch, the first event's id).
    pub fn trigger(&self, headers: &(impl ReadFields + ?Sized)) -> crate::backend::Trigger {
        self.trigger_from(|name| headers.field(name).and_then(text))
    }

    /// As [`Envelope::trigger`], reading the request's headers through `header`.
    pub fn trigger_from<'h>(&self, header: impl Fn(&str) -> Option<&'h str>) -> crate::backend::Trigger {
        let header = |name: &str| header(name).unwrap_or_default().to_string();
        match self.mode {
            Mode::Binary => crate::backend::Trigger {
                id: header("ce-id"),
                source: header("ce-source"),
                trace_id: None,
            },
            _ => crate::backend::Trigger {
                id: self.id().unwrap_or_default().to_string(),
                source: self.attribute(|a| a.source.as_deref()).unwrap_or_default().to_string(),
                trace_id: None,
            },
        }
    }

    /// The event's `type` (one event: binary or structured mode; `None` for a batch).
    pub fn event_type<'a>(&'a self, headers: &'a (impl ReadFields + ?Sized)) -> Option<&'a str> {
        match self.mode {
            Mode::Binary => headers.field("ce-type").and_then(text),
            Mode::Structured => self.attribute(|a| a.kind.as_deref()),
            Mode::Batch(_) => None,
        }
    }
}

/// Why a request is not a valid CloudEvent. Every variant names the attribute or header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// No `ce-specversion` header and not a CloudEvents content type.
    #[error("not a CloudEvent: no ce-specversion header and content type is not {STRUCTURED} or {BATCH}")]
    NotAnEvent,
    /// A required attribute is absent.
    #[error("missing required attribute \"{attribute}\" ({location})")]
    Missing {
        /// The attribute.
        attribute: &'static str,
        /// Where it was expected (`header ce-id`, `JSON member "id"`).
        location: String,
    },
    /// A required attribute is empty.
    #[error("attribute \"{attribute}\" must not be empty")]
    Empty {
        /// The attribute.
        attribute: &'static str,
    },
    /// `specversion` is not `1.0`.
    #[error("attribute \"specversion\" is {0:?}; only \"1.0\" is accepted")]
    SpecVersion(String),
    /// An attribute has the wrong type or format.
    #[error("attribute \"{attribute}\" is invalid: {message}")]
    Invalid {
        /// The attribute.
        attribute: String,
        /// What is wrong.
        message: String,
    },
    /// A `ce-` header value is not valid percent-encoded UTF-8.
    #[error("header {header}: {message}")]
    Header {
        /// The header name.
        header: String,
        /// What is wrong.
        message: String,
    },
    /// The body is not valid JSON (structured and batch mode).
    #[error("body is not valid JSON: {0}")]
    Json(String),
    /// Both `data` and `data_base64` are set.
    #[error("attributes \"data\" and \"data_base64\" are both set; at most one is allowed")]
    DataConflict,
    /// One event of a batch is invalid; the whole batch is rejected.
    #[error("batch event {index}: {error}")]
    Batch {
        /// Position in the batch, from 0.
        index: usize,
        /// What is wrong with it.
        error: Box<EventError>,
    },
}

impl EventError {
    /// The attribute this error is about, if one.
    pub fn attribute(&self) -> Option<&str> {
        match self {
            EventError::Missing { attribute, .. } | EventError::Empty { attribute } => Some(attribute),
            EventError::SpecVersion(_) => Some("specversion"),
            EventError::Invalid { attribute, .. } => Some(attribute),
            EventError::Header { header, .. } => header.strip_prefix("ce-"),
            EventError::DataConflict => Some("data_base64"),
            EventError::Batch { error, .. } => error.attribute(),
            EventError::NotAnEvent => Some("specversion"),
            EventError::Json(_) => None,
        }
    }
}

/// The media type of a `Content-Type` value, without parameters (compare it ignoring
/// ASCII case). Bytes, not text: only equality with two ASCII names is asked of it, and
/// a value that is not text equals neither.
fn media_type(headers: &(impl ReadFields + ?Sized)) -> Option<&[u8]> {
    let value = headers.field("content-type")?;
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    Some(value[..end].trim_ascii())
}

/// Validates a request's headers and body as one CloudEvent (or a batch).
pub fn validate(headers: &(impl ReadFields + ?Sized), body: Bytes) -> Result<Envelope, EventError> {
    let media_type = media_type(headers);
    let is = |wanted: &str| media_type.is_some_and(|m| m.eq_ignore_ascii_case(wanted.as_bytes()));
    match () {
        () if is(STRUCTURED) => {
            let attributes = validate_structured(&body)?;
            Ok(Envelope {
                mode: Mode::Structured,
                from_body: Some(Box::new(BodyAttributes {
                    id: Some(attributes.id),
                    kind: Some(attributes.kind),
                    source: Some(attributes.source),
                })),
                body,
            })
        }
        () if is(BATCH) => {
            let (count, id) = validate_batch(&body)?;
            Ok(Envelope {
                mode: Mode::Batch(count),
                from_body: (count > 0).then(|| {
                    Box::new(BodyAttributes {
                        id: Some(id),
                        ..BodyAttributes::default()
                    })
                }),
                body,
            })
        }
        () if headers.field("ce-specversion").is_some() => {
            validate_binary(headers)?;
            Ok(Envelope {
                mode: Mode::Binary,
                from_body: None,
                body,
            })
        }
        _ => Err(EventError::NotAnEvent),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http::HeaderMap;
    use http::HeaderValue;

    pub(super) fn binary(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    pub(super) type Headers = Vec<(&'static str, &'static [u8])>;

    pub(super) fn valid_binary() -> Headers {
        vec![
            ("ce-specversion", b"1.0"),
            ("ce-id", b"e-1"),
            ("ce-source", b"/sensors/1"),
            ("ce-type", b"com.example.reading"),
        ]
    }

    pub(super) fn without(name: &str) -> Headers {
        valid_binary().into_iter().filter(|(k, _)| *k != name).collect()
    }

    pub(super) fn structured(json: &str) -> Result<Envelope, EventError> {
        let h = binary(&[("content-type", b"application/cloudevents+json; charset=utf-8")]);
        validate(&h, Bytes::from(json.to_string()))
    }

    #[test]
    fn plain_post_is_not_an_event() {
        let h = binary(&[("content-type", b"application/json")]);
        assert_eq!(
            validate(&h, Bytes::from_static(b"{}")).unwrap_err(),
            EventError::NotAnEvent
        );
    }

    #[test]
    fn body_is_forwarded_byte_for_byte() {
        let json = "{ \"specversion\" : \"1.0\", \"id\":\"1\",\"source\":\"/s\",\"type\":\"t\" }";
        assert_eq!(structured(json).unwrap().body, json.as_bytes());
    }
}
