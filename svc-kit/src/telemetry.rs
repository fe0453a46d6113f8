//! Logs and traces: the `tracing` subscriber every binary installs first.
//!
//! - Logs: human-readable, or JSON lines; the level comes from `RUST_LOG`.
//! - Traces: spans always get W3C trace IDs (so orders and log lines carry
//!   one, and calls pass it on). They are exported only when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set, over
//!   OTLP/gRPC, through `tracing-opentelemetry`; otherwise a layer that gives
//!   spans their IDs and nothing else ([`trace_ids`]) stands in for it. The
//!   standard variables apply when exporting: `OTEL_SERVICE_NAME` overrides
//!   the service's own name, `OTEL_TRACES_SAMPLER`/`…_ARG` pick the sampler.
//!   Not exporting, every root span is marked sampled, as the default
//!   sampler marks it, and a caller's flag is passed on.
//!
//! - Over TLS when the endpoint is `https://`: the system's roots, or the CA
//!   in `OTEL_EXPORTER_OTLP_CERTIFICATE`, with a client certificate for mTLS in
//!   `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`/`…_CLIENT_KEY` (the spec's
//!   variables; the `…_TRACES_…` forms win). A file that cannot be read stops
//!   the start-up, naming the variable.
//!
//! `RUST_LOG` filters only the logs, so quieting logs never loses traces.

use std::path::PathBuf;

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_otlp::WithTonicConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use trace_ids::TraceIdsLayer;
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

/// The first of `names` that is set and not blank, with its name.
fn first_set(names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|&name| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (name, v))
    })
}

/// The exporter's TLS, when the variables ask for more than the defaults.
fn export_tls() -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    let ca = first_set(&[
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ]);
    let cert = first_set(&[
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    ]);
    let key = first_set(&[
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ]);
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let endpoint = first_set(&[
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]);
    if let Some((name, url)) = &endpoint
        && !url.trim_start().starts_with("https://")
    {
        anyhow::bail!(
            "OTEL_EXPORTER_OTLP_CERTIFICATE / …_CLIENT_CERTIFICATE / …_CLIENT_KEY are set, but {name} \
             is not an https:// URL: traces would go out in plaintext"
        );
    }
    let as_path = |(name, value): (&'static str, String)| (name, PathBuf::from(value));
    let (ca, cert, key) = (ca.map(as_path), cert.map(as_path), key.map(as_path));
    let identity = match (&cert, &key) {
        (Some((cert_name, cert)), Some((key_name, key))) => {
            Some(((*cert_name, cert.as_path()), (*key_name, key.as_path())))
        }
        (None, None) => None,
        _ => anyhow::bail!(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together: set both or neither"
        ),
    };
    let ca = ca.as_ref().map(|(name, ca)| (*name, ca.as_path()));
    crate::tls::client_config(ca, identity).map(Some)
}

/// Installs logging and tracing for `service_name` (e.g. `"stock-svc"`).
/// Installs nothing if a subscriber is already set (tests start many services
/// in one process); the guard is then inert. Fails only on a TLS setting of
/// the exporter that cannot be used.
pub fn init(service_name: &'static str, log_json: bool) -> anyhow::Result<TelemetryGuard> {
    global::set_text_map_propagator(TraceContextPropagator::new());

    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,opentelemetry=warn,opentelemetry_sdk=warn"));
    let logs = if log_json {
        fmt::layer().json().with_filter(log_filter).boxed()
    } else {
        fmt::layer().with_filter(log_filter).boxed()
    };
    // Our spans are at INFO; library internals (h2, hyper) stay out of traces.
    let spans = LevelFilter::INFO;
    let exporter = if export_configured() {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(tls) = export_tls()? {
            exporter = exporter.with_tls_config(tls);
        }
        exporter
            .build()
            .inspect_err(|err| eprintln!("OTLP trace export disabled: {err}"))
            .ok()
    } else {
        None
    };
    let Some(exporter) = exporter else {
        // Nothing exports: spans need their IDs and nothing more
        // (`trace_ids`). The OpenTelemetry layer built every span whole for
        // no one, about a sixth of the CPU under load (docs/benchmarks.md).
        // Already set (tests): that one stays.
        let _ = tracing_subscriber::registry()
            .with(logs)
            .with(TraceIdsLayer.with_filter(spans))
            .try_init();
        return Ok(TelemetryGuard { provider: None });
    };

    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name);
    }
    let builder = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter);
    let provider = builder.build();
    let tracer = provider.tracer(service_name);

    // A saga keeps its span (and a call's span) open for its whole life, so
    // each byte per span counts 10,000 times over with that many in flight:
    // - no thread attributes: a task moves between threads, so the thread a
    //   span began on says nothing, and its name cost an allocation per span;
    // - no source location or target (four attributes that name our code,
    //   not the order) and no busy/idle timings (an extension per span,
    //   updated at every poll of an instrumented future);
    // - no OpenTelemetry context activation at every poll: trace context is
    //   read from the span itself (`trace_ids::SpanTraceExt`).
    let traces = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(spans);
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .is_ok();
    if !installed {
        return Ok(TelemetryGuard { provider: None });
    }
    global::set_tracer_provider(provider.clone());
    tracing::info!(service = service_name, "exporting traces over OTLP");
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}
