//! A saga's trace must outlive the process that started it: its span's W3C
//! `traceparent` is stored with the saga, and a resumed saga's span adopts it.
//! (The services' own propagation lives in svc-kit; the engine needs only this.)

use std::collections::HashMap;

use opentelemetry::{Context, global, trace::TraceContextExt};
use trace_ids::SpanTraceExt;
use tracing::Span;

/// The `traceparent` of a span; empty when the span is not recorded.
pub fn traceparent(span: &Span) -> String {
    let cx = span.trace_context();
    let mut carrier = HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent").unwrap_or_default()
}

/// Makes `span` a child of the span a stored `traceparent` names. Must come
/// before anything reads the span's context.
pub fn adopt(span: &Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let parent: Context = global::get_text_map_propagator(|p| p.extract(&carrier));
    if parent.span().span_context().is_valid() {
        span.adopt_parent(parent);
    }
}
