//! The OTLP trace exporter, configured the standard way: `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `…_TRACES_ENDPOINT`) turns it on, `OTEL_EXPORTER_OTLP_PROTOCOL` (or
//! `…_TRACES_PROTOCOL`) picks `grpc` or `http/protobuf` (the specification's default),
//! and `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off. The
//! exporter and SDK read the rest themselves: `…_HEADERS`, `…_TIMEOUT`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]` and the batch processor's
//! `OTEL_BSP_*` bounds (queue 2048 spans, dropped beyond that; batches of 512; every 5 s).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry::KeyValue;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// How spans travel to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318 by convention; `/v1/traces` is appended
    /// to `OTEL_EXPORTER_OTLP_ENDPOINT`).
    HttpProtobuf,
}

impl Protocol {
    /// The `OTEL_EXPORTER_OTLP_PROTOCOL` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// What the OTEL_* variables ask for, when they ask for traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The collector (as given; the exporter adds the signal path where the spec says).
    pub endpoint: String,
    /// How to reach it.
    pub protocol: Protocol,
    /// Whether `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names the service
    /// (else it is `vm-activator`).
    pub service_named: bool,
}

/// An OTEL_* setting the activator cannot honour: it refuses to start rather than run
/// without the traces someone asked for.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// A variable has a value we do not support.
    #[error("{name}={value:?}: {supported}")]
    Unsupported {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is supported.
        supported: &'static str,
    },
    /// The exporter refused its configuration.
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

impl OtlpSettings {
    /// Reads the settings through `var` (the environment, or a table in tests). `None`:
    /// traces are off.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<OtlpSettings>, OtlpError> {
        let set = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match set("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(OtlpError::Unsupported {
                    name: "OTEL_TRACES_EXPORTER",
                    value: other.to_string(),
                    supported: "supported: otlp, none",
                })
            }
        }
        let Some(endpoint) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        else {
            return Ok(None);
        };
        let (name, value) = match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(value) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", Some(value)),
            None => ("OTEL_EXPORTER_OTLP_PROTOCOL", set("OTEL_EXPORTER_OTLP_PROTOCOL")),
        };
        let protocol = match value.as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                return Err(OtlpError::Unsupported {
                    name,
                    value: other.to_string(),
                    supported: "supported: grpc, http/protobuf",
                })
            }
        };
        let service_named = set("OTEL_SERVICE_NAME").is_some()
            || set("OTEL_RESOURCE_ATTRIBUTES")
                .is_some_and(|attrs| attrs.split(',').any(|kv| kv.trim().starts_with("service.name=")));
        Ok(Some(OtlpSettings {
            endpoint,
            protocol,
            service_named,
        }))
    }
}

/// The tracer provider: the exporter behind the SDK's batch processor (its own thread,
/// bounded queue), with the resource the environment describes.
pub(super) fn provider(settings: &OtlpSettings) -> Result<SdkTracerProvider, OtlpError> {
    let exporter = match settings.protocol {
        Protocol::Grpc => SpanExporter::builder().with_tonic().build()?,
        Protocol::HttpProtobuf => SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(OnRuntime::new(export_timeout()))
            .build()?,
    };
    let mut resource = Resource::builder();
    if !settings.service_named {
        resource = resource.with_service_name("vm-activator");
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_resource(resource)
        .build())
}

/// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT` (milliseconds; 10 s by default).
fn export_timeout() -> Duration {
    ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// hyper's client, run on the Tokio runtime: the batch processor exports from a thread
/// of its own, where hyper's connections could not be driven.
#[derive(Clone, Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

impl OnRuntime {
    fn new(timeout: Duration) -> OnRuntime {
        OnRuntime {
            client: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

#[async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Environment variables, name and value.
    type Vars<'a> = &'a [(&'a str, &'a str)];

    fn settings(vars: Vars) -> Result<Option<OtlpSettings>, OtlpError> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        OtlpSettings::from_env(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    #[test]
    fn reads_the_standard_variables() {
        let on = |endpoint: &str, protocol, service_named| {
            Some(OtlpSettings {
                endpoint: endpoint.to_string(),
                protocol,
                service_named,
            })
        };
        use Protocol::*;
        let table: &[(Vars, Option<OtlpSettings>)] = &[
            (&[], None),
            (&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")], None),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")],
                on("http://c:4318", HttpProtobuf, false),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ],
                on("http://c:4317", Grpc, false),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b/v1/traces"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ],
                on("http://b/v1/traces", HttpProtobuf, false),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_SERVICE_NAME", "edge"),
                ],
                on("http://c", HttpProtobuf, true),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.name=x"),
                ],
                on("http://c", HttpProtobuf, true),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_SDK_DISABLED", "TRUE"),
                ],
                None,
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_TRACES_EXPORTER", "none"),
                ],
                None,
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_TRACES_EXPORTER", "otlp"),
                ],
                on("http://c", HttpProtobuf, false),
            ),
        ];
        for (vars, expected) in table {
            assert_eq!(&settings(vars).unwrap(), expected, "{vars:?}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_honour_naming_the_variable() {
        for (vars, named) in [
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
                ][..],
                "OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\"",
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp"),
                ][..],
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=\"udp\"",
            ),
            (
                &[("OTEL_TRACES_EXPORTER", "zipkin")][..],
                "OTEL_TRACES_EXPORTER=\"zipkin\"",
            ),
        ] {
            let error = settings(vars).unwrap_err().to_string();
            assert!(error.starts_with(named), "{error}");
        }
    }
}
