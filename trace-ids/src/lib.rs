//! W3C trace and span IDs for `tracing` spans, whether or not they are
//! exported.
//!
//! Every span of ours carries a trace ID, exported or not: an order shows its
//! trace ID, log lines carry it, and calls pass it on as `traceparent`, so
//! that one order is one trace across the four services.
//!
//! - **Exporting** (an OTLP endpoint is set), `tracing-opentelemetry`'s layer
//!   gives spans their IDs, and builds each span whole for export: its
//!   attributes, timings, and the SDK span at its end.
//! - **Not exporting**, all of that work served only the IDs. It was about a
//!   sixth of each process's CPU under load (docs/benchmarks.md). So
//!   [`TraceIdsLayer`] gives spans their IDs alone: a trace ID inherited from
//!   the parent span (or new for a root), a new span ID, and nothing else.
//!
//! Code reads and sets a span's context through [`SpanTraceExt`], which asks
//! whichever of the two layers is installed.

use opentelemetry::{
    Context,
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use tracing::{Span, Subscriber, span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{Layer, Registry, layer, registry::LookupSpan};

/// Gives every span it sees a W3C span context, and does nothing else.
///
/// A root span gets a new trace ID and is marked sampled, as the SDK's
/// default sampler (parent-based, always on) marks it; a child inherits its
/// parent's trace ID, flags and state. Install it on a [`Registry`] (through
/// layers), with the same filter as the spans that should carry IDs.
#[derive(Debug, Default, Clone, Copy)]
pub struct TraceIdsLayer;

/// A span's context, kept in its extensions.
struct Ids(SpanContext);

impl<S> Layer<S> for TraceIdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: layer::Context<'_, S>) {
        // As tracing-opentelemetry finds a parent: the explicit one if this
        // layer sees it, else the current span for a contextual span.
        let parent = match attrs.parent() {
            Some(parent) => ctx.span(parent),
            None if attrs.is_contextual() => ctx.lookup_current(),
            None => None,
        };
        let inherited = parent.and_then(|p| p.extensions().get::<Ids>().map(|ids| ids.0.clone()));
        let context = match inherited {
            Some(parent) => SpanContext::new(
                parent.trace_id(),
                new_span_id(),
                parent.trace_flags(),
                false,
                parent.trace_state().clone(),
            ),
            None => SpanContext::new(
                new_trace_id(),
                new_span_id(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Ids(context));
        }
    }
}

fn new_trace_id() -> TraceId {
    // Zero is the invalid ID; a random u128 is zero once in 2^128 draws.
    TraceId::from(rand::random::<u128>().max(1))
}

fn new_span_id() -> SpanId {
    SpanId::from(rand::random::<u64>().max(1))
}

/// A span's trace context, read and set the same way under either layer.
pub trait SpanTraceExt {
    /// The span's context (its trace and span IDs), to inject into a call
    /// or to store; an empty context when the span has none (disabled, or
    /// no layer gives IDs).
    fn trace_context(&self) -> Context;

    /// Makes the span a child of `parent` (a context extracted from a call or
    /// a stored `traceparent`), if `parent` names a valid span. Must come
    /// before the span has children or anything reads its context: those
    /// keep the trace they had.
    fn adopt_parent(&self, parent: Context);
}

impl SpanTraceExt for Span {
    fn trace_context(&self) -> Context {
        match with_ids(self, |ids| ids.0.clone()) {
            Some(context) => Context::new().with_remote_span_context(context),
            None => OpenTelemetrySpanExt::context(self),
        }
    }

    fn adopt_parent(&self, parent: Context) {
        let remote = parent.span().span_context().clone();
        if !remote.is_valid() {
            return;
        }
        let adopted = with_ids(self, |ids| {
            ids.0 = SpanContext::new(
                remote.trace_id(),
                ids.0.span_id(),
                remote.trace_flags(),
                false,
                remote.trace_state().clone(),
            );
        });
        if adopted.is_none() {
            let _ = OpenTelemetrySpanExt::set_parent(self, parent);
        }
    }
}

/// Runs `f` on the span's [`Ids`], if [`TraceIdsLayer`] gave it some.
fn with_ids<T>(span: &Span, f: impl FnOnce(&mut Ids) -> T) -> Option<T> {
    let mut f = Some(f);
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span(id)?;
        let mut extensions = data.extensions_mut();
        let ids = extensions.get_mut::<Ids>()?;
        f.take().map(|f| f(ids))
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::{global, propagation::TextMapPropagator};
    use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
    use tracing::{Level, debug_span, info_span};
    use tracing_subscriber::{filter::LevelFilter, prelude::*};

    use super::*;

    fn traceparent(span: &Span) -> String {
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&span.trace_context(), &mut carrier);
        carrier.remove("traceparent").unwrap_or_default()
    }

    fn remote(traceparent: &str) -> Context {
        let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        TraceContextPropagator::new().extract(&carrier)
    }

    fn ids(span: &Span) -> (TraceId, SpanId, TraceFlags) {
        let cx = span.trace_context();
        let context = cx.span().span_context().clone();
        (context.trace_id(), context.span_id(), context.trace_flags())
    }

    fn with_ids_layer(test: impl FnOnce()) {
        let subscriber =
            tracing_subscriber::registry().with(TraceIdsLayer.with_filter(LevelFilter::INFO));
        tracing::subscriber::with_default(subscriber, test);
    }

    #[test]
    fn a_root_span_starts_a_sampled_trace_and_its_children_share_it() {
        with_ids_layer(|| {
            let root = info_span!("root");
            let (trace, root_span, flags) = ids(&root);
            assert_ne!(trace, TraceId::INVALID);
            assert!(flags.is_sampled());
            let child = root.in_scope(|| info_span!("child"));
            let explicit = info_span!(parent: &root, "explicit child");
            for span in [&child, &explicit] {
                let (child_trace, child_span, _) = ids(span);
                assert_eq!(child_trace, trace);
                assert_ne!(child_span, root_span);
                assert_ne!(child_span, SpanId::INVALID);
            }
            let other = info_span!("another root");
            assert_ne!(ids(&other).0, trace, "each root starts its own trace");
        });
    }

    #[test]
    fn a_span_adopts_a_remote_parent_and_its_children_follow() {
        with_ids_layer(|| {
            let span = info_span!("server");
            let own_span = ids(&span).1;
            span.adopt_parent(remote(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ));
            let child = span.in_scope(|| info_span!("handler"));
            for s in [&span, &child] {
                assert_eq!(
                    ids(s).0.to_string(),
                    "4bf92f3577b34da6a3ce929d0e0e4736",
                    "the caller's trace"
                );
            }
            assert_eq!(ids(&span).1, own_span, "the span keeps its own ID");
            assert_eq!(
                traceparent(&child),
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", ids(&child).1)
            );
            // An unsampled caller's flag is kept, so a service that exports
            // leaves the trace out as the caller asked.
            let unsampled = info_span!("server");
            unsampled.adopt_parent(remote(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            ));
            assert!(!ids(&unsampled).2.is_sampled());
        });
    }

    #[test]
    fn an_invalid_parent_is_ignored_and_a_filtered_span_has_no_context() {
        with_ids_layer(|| {
            let span = info_span!("server");
            let before = ids(&span);
            span.adopt_parent(remote("not a traceparent"));
            assert_eq!(ids(&span), before);

            // Below the layer's filter: no IDs, and a span entered inside it
            // takes the trace of the nearest entered span that has them.
            let root = info_span!("root");
            let quiet = root.in_scope(|| debug_span!("library internals"));
            assert_eq!(traceparent(&quiet), "");
            let child = root.in_scope(|| quiet.in_scope(|| tracing::span!(Level::INFO, "child")));
            assert_eq!(ids(&child).0, ids(&root).0);
            assert_eq!(traceparent(&Span::none()), "");
        });
    }

    #[test]
    fn under_the_opentelemetry_layer_the_same_calls_reach_it() {
        // Exporting: tracing-opentelemetry's layer gives the IDs, and the
        // same two calls must read and set them there.
        let provider = SdkTracerProvider::builder().build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        global::set_text_map_propagator(TraceContextPropagator::new());
        tracing::subscriber::with_default(subscriber, || {
            let span = info_span!("server");
            span.adopt_parent(remote(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ));
            let child = span.in_scope(|| info_span!("handler"));
            assert_eq!(
                ids(&child).0.to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert!(traceparent(&child).starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        });
    }
}
