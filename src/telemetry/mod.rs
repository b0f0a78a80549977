//! Logs and traces for the whole process: the `tracing` subscriber (text or JSON lines
//! on stderr, filtered by `RUST_LOG`) and, when the standard `OTEL_*` variables ask for
//! it, OpenTelemetry traces exported over OTLP (`otlp`).
//!
//! Owns: the process's subscriber and tracer provider, and the one switch the ingress
//! reads ([`enabled`]) so that with tracing off the warm path creates no span at all.
//! The spans of a delivered event are `event`'s. Must not import the ingress, the
//! lifecycle or a backend: they call in here, never the reverse.

pub mod event;
mod otlp;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;
pub use otlp::{OtlpError, OtlpSettings, Protocol};

/// The `target` of the spans exported as traces: only these go to the collector, not
/// every span a dependency makes (kube-rs, hyper), and `RUST_LOG` does not turn them off.
pub const TRACE_TARGET: &str = "vm_activator::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The tracer that spans recorded after the fact (`event::held`) are made with.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Whether traces are exported. Read on every request: when false, no span is made.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The process's telemetry; [`Telemetry::shutdown`] exports the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is queued (bounded by `OTEL_BSP_EXPORT_TIMEOUT`) and stops exporting.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            ENABLED.store(false, Ordering::Relaxed);
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "traces: the last spans could not be exported");
            }
        }
    }
}

/// Sets up logging (`RUST_LOG`, default `info`, in `format`) and — when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set —
/// trace export. Must run inside the Tokio runtime (the exporters' connections live
/// there). Fails on an OTEL_* setting it cannot honour, naming it.
pub fn init(format: LogFormat) -> Result<Telemetry, OtlpError> {
    let settings = OtlpSettings::from_env(|name| std::env::var(name).ok())?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let Some(settings) = settings else {
        // Logs only: the plain subscriber, one global filter.
        let logs = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match format {
            LogFormat::Json => logs.json().init(),
            LogFormat::Text => logs.init(),
        }
        return Ok(Telemetry { provider: None });
    };
    // Logs and traces: each layer filters for itself, so that `RUST_LOG` does not turn
    // the exported spans off and the exporter sees only ours.
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => logs.json().boxed(),
        LogFormat::Text => logs.boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    let provider = otlp::provider(&settings)?;
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "vm-activator");
    let _ = TRACER.set(tracer.clone());
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target() == TRACE_TARGET
        }));
    registry.with(traces).init();
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(
        endpoint = %settings.endpoint,
        protocol = settings.protocol.as_str(),
        "exporting traces over OTLP"
    );
    Ok(Telemetry {
        provider: Some(provider),
    })
}
