//! Logs and traces: the `tracing` subscriber every binary installs first.
//!
//! - Logs: human-readable, or JSON lines; the level comes from `RUST_LOG`.
//! - Traces: `tracing` spans bridged to OpenTelemetry. Spans always get W3C
//!   trace IDs (so orders and log lines carry one), but they are exported only
//!   when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set, over
//!   OTLP/gRPC. The standard variables apply: `OTEL_SERVICE_NAME` overrides the
//!   service's own name, `OTEL_TRACES_SAMPLER`/`…_ARG` pick the sampler.
//!
//! `RUST_LOG` filters only the logs, so quieting logs never loses traces.

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, filter::LevelFilter, fmt, prelude::*};

/// Flushes and stops trace export when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // `shutdown` blocks on the export; keep it off the async threads.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// True when an OTLP endpoint is configured.
pub fn export_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()))
}

/// Installs logging and tracing for `service_name` (e.g. `"stock-svc"`).
/// Installs nothing if a subscriber is already set (tests start many services
/// in one process); the guard is then inert.
pub fn init(service_name: &'static str, log_json: bool) -> TelemetryGuard {
    global::set_text_map_propagator(TraceContextPropagator::new());

    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name);
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    let exporting = export_configured();
    if exporting {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(err) => eprintln!("OTLP trace export disabled: {err}"),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(service_name);

    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,opentelemetry=warn,opentelemetry_sdk=warn"));
    let logs = if log_json {
        fmt::layer().json().with_filter(log_filter).boxed()
    } else {
        fmt::layer().with_filter(log_filter).boxed()
    };
    // Our spans are at INFO; library internals (h2, hyper) stay out of traces.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if !installed {
        return TelemetryGuard { provider: None };
    }
    global::set_tracer_provider(provider.clone());
    if exporting {
        tracing::info!(service = service_name, "exporting traces over OTLP");
    }
    TelemetryGuard {
        provider: Some(provider),
    }
}
