//! W3C trace context across processes: injected into the metadata of every
//! outgoing call and extracted on every server. (A saga's trace, which must
//! outlive its process, is stored by the engine: `saga_engine::trace_context`.)

use opentelemetry::{
    global,
    propagation::{Extractor, Injector},
    trace::TraceContextExt,
};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use trace_ids::SpanTraceExt;
use tracing::Span;

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(&value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's context into outgoing call metadata.
pub fn inject_current(metadata: &mut MetadataMap) {
    let cx = Span::current().trace_context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// The server span of one gRPC call, child of the caller's span when the call
/// carries a `traceparent`. Health and reflection calls get none, to keep
/// traces about business; so does a batch call, whose items each get the
/// span their own call would have ([`item_span`]).
pub fn server_span(request: &http::Request<()>) -> Span {
    let path = request.uri().path();
    // Health, reflection, and any path that is not a method of the contract
    // (anyone may send those, before any key check): no span.
    if !crate::methods::is_known(path) || crate::methods::is_batch(path) {
        return Span::none();
    }
    method_span(
        path.trim_start_matches('/'),
        &HeaderExtractor(request.headers()),
    )
}

/// The server span of one item of a batch of `method` (the item's own
/// method, e.g. `stock.v1.StockService/ReserveStock`), child of the item's
/// trace context: what [`server_span`] gives the item's call when it comes
/// alone.
pub fn item_span(method: &'static str, traceparent: &str, tracestate: &str) -> Span {
    method_span(
        method,
        &ItemContext {
            traceparent,
            tracestate,
        },
    )
}

fn method_span(method: &str, carrier: &dyn Extractor) -> Span {
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        trace_id = tracing::field::Empty,
    );
    let parent = global::get_text_map_propagator(|p| p.extract(carrier));
    if parent.span().span_context().is_valid() {
        span.adopt_parent(parent);
    }
    span.record("trace_id", span.trace_id());
    span
}

/// A batch item's trace context, as a carrier.
struct ItemContext<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl Extractor for ItemContext<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" if !self.traceparent.is_empty() => Some(self.traceparent),
            "tracestate" if !self.tracestate.is_empty() => Some(self.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The current span's context as W3C `traceparent` and `tracestate` (each
/// empty when there is none): what a batch item carries in place of its
/// call's metadata.
pub fn current_context() -> (String, String) {
    let cx = Span::current().trace_context();
    let mut carrier = ContextStrings::default();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    (carrier.traceparent, carrier.tracestate)
}

#[derive(Default)]
struct ContextStrings {
    traceparent: String,
    tracestate: String,
}

impl Injector for ContextStrings {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = value,
            "tracestate" => self.tracestate = value,
            _ => {}
        }
    }
}

/// Records request fields on the current span (declared `Empty` in the
/// handler's `#[instrument]`), once they passed validation: a raw field
/// never reaches a span or a log line, whatever a caller put in it.
pub fn record_fields(fields: &[(&'static str, &str)]) {
    let span = Span::current();
    for (name, value) in fields {
        span.record(*name, *value);
    }
}
