//! CloudEvents validation for the HTTP protocol binding (CloudEvents 1.0): binary
//! mode (attributes in `ce-` headers, percent-decoded), structured mode
//! (`application/cloudevents+json`) and batch mode (`application/cloudevents-batch+json`,
//! validated as a whole). The sender's bytes are forwarded untouched: validation never
//! re-serialises the event.
//!
//! Owns: what counts as a valid event and the error that names the attribute.
//! Must not import the activator, gate, backend or axum (it takes `http` types only).

use bytes::Bytes;
use cloudevents::event::TryIntoTime;
use cloudevents::{EventBuilder, EventBuilderV10};
use http::header::{HeaderMap, CONTENT_TYPE};
use serde_json::{Map, Value};
use std::borrow::Cow;

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
    /// The event's `id` (the first event's for a batch; empty for an empty batch).
    pub id: String,
    /// The body as received.
    pub body: Bytes,
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

/// The media type of a `Content-Type` value, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// Validates a request's headers and body as one CloudEvent (or a batch).
pub fn validate(headers: &HeaderMap, body: Bytes) -> Result<Envelope, EventError> {
    match media_type(headers).as_deref() {
        Some(STRUCTURED) => {
            let id = validate_structured(&body)?;
            Ok(Envelope {
                mode: Mode::Structured,
                id,
                body,
            })
        }
        Some(BATCH) => {
            let (count, id) = validate_batch(&body)?;
            Ok(Envelope {
                mode: Mode::Batch(count),
                id,
                body,
            })
        }
        _ if headers.contains_key("ce-specversion") => {
            let id = validate_binary(headers)?;
            Ok(Envelope {
                mode: Mode::Binary,
                id,
                body,
            })
        }
        _ => Err(EventError::NotAnEvent),
    }
}

/// Binary mode: every `ce-` header must be a valid attribute name with a valid
/// percent-encoded UTF-8 value; the required ones present, non-empty and well-formed.
fn validate_binary(headers: &HeaderMap) -> Result<String, EventError> {
    let mut attrs: [Option<Cow<'_, str>>; 4] = Default::default();
    let mut time = None;
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if attribute.is_empty()
            || attribute.len() > 20
            || !attribute.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(EventError::Header {
                header: name.to_string(),
                message: "attribute names are 1-20 characters of a-z and 0-9".into(),
            });
        }
        let decoded = percent_decode(value.as_bytes()).map_err(|message| EventError::Header {
            header: name.to_string(),
            message,
        })?;
        if let Some(slot) = REQUIRED.iter().position(|r| *r == attribute) {
            if attrs[slot].is_some() {
                return Err(EventError::Header {
                    header: name.to_string(),
                    message: "appears more than once".into(),
                });
            }
            attrs[slot] = Some(decoded);
        } else if attribute == "time" {
            time = Some(decoded);
        }
    }
    let [specversion, id, source, ty] = attrs;
    let specversion = required(specversion, "specversion")?;
    if specversion != "1.0" {
        return Err(EventError::SpecVersion(specversion.into_owned()));
    }
    let id = required(id, "id")?;
    let source = required(source, "source")?;
    let ty = required(ty, "type")?;
    // The SDK's builder checks the formats (source URI-reference, RFC 3339 time).
    let mut builder = EventBuilderV10::new().id(&*id).source(&*source).ty(&*ty);
    if let Some(time) = time {
        builder = builder.time(&*time);
    }
    builder.build().map_err(builder_error)?;
    Ok(id.into_owned())
}

/// A required attribute: present and non-empty.
fn required<'a>(value: Option<Cow<'a, str>>, attribute: &'static str) -> Result<Cow<'a, str>, EventError> {
    match value {
        None => Err(EventError::Missing {
            attribute,
            location: format!("header ce-{attribute}"),
        }),
        Some(v) if v.is_empty() => Err(EventError::Empty { attribute }),
        Some(v) => Ok(v),
    }
}

fn builder_error(e: cloudevents::event::EventBuilderError) -> EventError {
    use cloudevents::event::EventBuilderError as B;
    let attribute = match &e {
        B::MissingRequiredAttribute { attribute_name }
        | B::ParseTimeError { attribute_name, .. }
        | B::ParseUrlError { attribute_name, .. }
        | B::InvalidUriRefError { attribute_name } => attribute_name.to_string(),
    };
    EventError::Invalid {
        attribute,
        message: e.to_string(),
    }
}

/// Decodes a binary-mode header value (HTTP binding §3.1.3.2): `%XX` escapes must be
/// complete hex pairs, and the decoded bytes valid UTF-8.
///
/// ```
/// use vm_activator::ingress::cloudevent::percent_decode;
/// assert_eq!(percent_decode(b"caf%C3%A9 %25").unwrap(), "café %");
/// assert!(percent_decode(b"100%").is_err());
/// ```
pub fn percent_decode(raw: &[u8]) -> Result<Cow<'_, str>, String> {
    if !raw.contains(&b'%') {
        // The common case: nothing to decode, nothing to allocate.
        return std::str::from_utf8(raw)
            .map(Cow::Borrowed)
            .map_err(|_| "value is not valid UTF-8".to_string());
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or("incomplete percent-encoding at the end")?;
            let text = std::str::from_utf8(hex).map_err(|_| "bad percent-encoding")?;
            let byte = u8::from_str_radix(text, 16)
                .ok()
                .filter(|_| hex.iter().all(u8::is_ascii_hexdigit))
                .ok_or_else(|| format!("bad percent-encoding %{}", String::from_utf8_lossy(hex)))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| "value is not valid UTF-8 after percent-decoding".to_string())
}

fn parse_json(body: &[u8]) -> Result<Value, EventError> {
    serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))
}

fn validate_structured(body: &[u8]) -> Result<String, EventError> {
    match parse_json(body)? {
        Value::Object(map) => validate_object(map),
        _ => Err(EventError::Json("a structured-mode event must be a JSON object".into())),
    }
}

fn validate_batch(body: &[u8]) -> Result<(usize, String), EventError> {
    let Value::Array(events) = parse_json(body)? else {
        return Err(EventError::Json("a batch must be a JSON array of events".into()));
    };
    let count = events.len();
    let mut first_id = String::new();
    for (index, event) in events.into_iter().enumerate() {
        let wrap = |error| EventError::Batch {
            index,
            error: Box::new(error),
        };
        let Value::Object(map) = event else {
            return Err(wrap(EventError::Json("not a JSON object".into())));
        };
        let id = validate_object(map).map_err(wrap)?;
        if index == 0 {
            first_id = id;
        }
    }
    Ok((count, first_id))
}

/// Structured mode: required attributes present, strings, non-empty; `specversion`
/// 1.0; not both `data` and `data_base64`; then the SDK checks the rest (formats of
/// `source`, `time`, `dataschema`, extension types).
fn validate_object(map: Map<String, Value>) -> Result<String, EventError> {
    let mut values = [""; 4];
    for (slot, attribute) in REQUIRED.iter().enumerate() {
        match map.get(*attribute) {
            None => {
                return Err(EventError::Missing {
                    attribute,
                    location: format!("JSON member \"{attribute}\""),
                })
            }
            Some(Value::String(s)) if s.is_empty() => return Err(EventError::Empty { attribute }),
            Some(Value::String(s)) => values[slot] = s,
            Some(_) => {
                return Err(EventError::Invalid {
                    attribute: attribute.to_string(),
                    message: "must be a string".into(),
                })
            }
        }
    }
    if values[0] != "1.0" {
        return Err(EventError::SpecVersion(values[0].to_string()));
    }
    if map.contains_key("data") && map.contains_key("data_base64") {
        return Err(EventError::DataConflict);
    }
    if let Some(time) = map.get("time") {
        let valid = time.as_str().is_some_and(|t| t.into_time().is_ok());
        if !valid {
            return Err(EventError::Invalid {
                attribute: "time".into(),
                message: format!("{time} is not an RFC 3339 timestamp"),
            });
        }
    }
    let id = values[1].to_string();
    serde_json::from_value::<cloudevents::Event>(Value::Object(map)).map_err(|e| {
        let message = e.to_string();
        let attribute = [
            "time",
            "dataschema",
            "source",
            "data_base64",
            "datacontenttype",
            "subject",
        ]
        .into_iter()
        .find(|a| message.contains(a))
        .unwrap_or("event")
        .to_string();
        EventError::Invalid { attribute, message }
    })?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn binary(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    type Headers = Vec<(&'static str, &'static [u8])>;

    fn valid_binary() -> Headers {
        vec![
            ("ce-specversion", b"1.0"),
            ("ce-id", b"e-1"),
            ("ce-source", b"/sensors/1"),
            ("ce-type", b"com.example.reading"),
        ]
    }

    fn without(name: &str) -> Headers {
        valid_binary().into_iter().filter(|(k, _)| *k != name).collect()
    }

    fn structured(json: &str) -> Result<Envelope, EventError> {
        let h = binary(&[("content-type", b"application/cloudevents+json; charset=utf-8")]);
        validate(&h, Bytes::from(json.to_string()))
    }

    #[test]
    fn binary_mode_table() {
        let cases: Vec<(&str, Headers, Option<&str>)> = vec![
            ("valid", valid_binary(), None),
            ("missing id", without("ce-id"), Some("id")),
            ("missing source", without("ce-source"), Some("source")),
            ("missing type", without("ce-type"), Some("type")),
            (
                "empty id",
                [without("ce-id"), vec![("ce-id", b"")]].concat(),
                Some("id"),
            ),
            (
                "spec 0.3",
                [without("ce-specversion"), vec![("ce-specversion", b"0.3")]].concat(),
                Some("specversion"),
            ),
            (
                "spec 2.0",
                [without("ce-specversion"), vec![("ce-specversion", b"2.0")]].concat(),
                Some("specversion"),
            ),
            (
                "bad escape",
                [valid_binary(), vec![("ce-subject", b"a%zzb")]].concat(),
                Some("subject"),
            ),
            (
                "cut escape",
                [valid_binary(), vec![("ce-subject", b"a%4")]].concat(),
                Some("subject"),
            ),
            (
                "bad utf8",
                [valid_binary(), vec![("ce-subject", b"%ff%fe")]].concat(),
                Some("subject"),
            ),
            (
                "bad time",
                [valid_binary(), vec![("ce-time", b"yesterday")]].concat(),
                Some("time"),
            ),
            (
                "bad name",
                [valid_binary(), vec![("ce-my_ext", b"x")]].concat(),
                Some("my_ext"),
            ),
            (
                "duplicate id",
                [valid_binary(), vec![("ce-id", b"e-2")]].concat(),
                Some("id"),
            ),
            (
                "encoded ok",
                [valid_binary(), vec![("ce-subject", b"caf%C3%A9%20au%20lait")]].concat(),
                None,
            ),
        ];
        for (name, headers, expected) in cases {
            let result = validate(&binary(&headers), Bytes::new());
            match expected {
                None => assert!(result.is_ok(), "{name}: {result:?}"),
                Some(attribute) => {
                    let err = result.expect_err(name);
                    assert_eq!(err.attribute(), Some(attribute), "{name}: {err}");
                }
            }
        }
    }

    #[test]
    fn percent_decoding_decodes_utf8() {
        assert_eq!(percent_decode(b"caf%C3%A9").unwrap(), "café");
        assert_eq!(percent_decode(b"100%25").unwrap(), "100%");
        assert!(percent_decode(b"%").is_err());
        assert!(percent_decode(b"%+1").is_err());
    }

    #[test]
    fn structured_mode_table() {
        let cases: Vec<(&str, &str, Option<&str>)> = vec![
            (
                "valid",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"a":1}}"#,
                None,
            ),
            (
                "missing id",
                r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
                Some("id"),
            ),
            (
                "empty type",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":""}"#,
                Some("type"),
            ),
            (
                "number id",
                r#"{"specversion":"1.0","id":1,"source":"/s","type":"t"}"#,
                Some("id"),
            ),
            (
                "spec 0.3",
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                Some("specversion"),
            ),
            (
                "both data",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
                Some("data_base64"),
            ),
            (
                "bad time",
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"noon"}"#,
                Some("time"),
            ),
            ("bad json", r#"{"specversion":"1.0","#, None),
            ("array", r#"[]"#, None),
        ];
        for (name, json, attribute) in cases {
            let result = structured(json);
            if name == "valid" {
                assert_eq!(result.unwrap().id, "1");
                continue;
            }
            let err = result.expect_err(name);
            assert_eq!(err.attribute(), attribute, "{name}: {err}");
        }
    }

    #[test]
    fn batch_is_validated_as_a_whole() {
        let h = binary(&[("content-type", b"application/cloudevents-batch+json")]);
        let ok = r#"[{"specversion":"1.0","id":"a","source":"/s","type":"t"},{"specversion":"1.0","id":"b","source":"/s","type":"t"}]"#;
        let env = validate(&h, Bytes::from_static(ok.as_bytes())).unwrap();
        assert_eq!(env.mode, Mode::Batch(2));
        assert_eq!(env.id, "a");
        let bad = r#"[{"specversion":"1.0","id":"a","source":"/s","type":"t"},{"specversion":"1.0","source":"/s","type":"t"}]"#;
        let err = validate(&h, Bytes::from_static(bad.as_bytes())).unwrap_err();
        assert!(matches!(err, EventError::Batch { index: 1, .. }), "{err}");
        assert_eq!(err.attribute(), Some("id"));
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
