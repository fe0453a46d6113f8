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

use std::sync::atomic::{AtomicBool, Ordering};

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

/// A span's context, kept in its extensions, and whether anything has used
/// it yet (a read, or a child that inherited it): after that the span keeps
/// its trace, as `tracing-opentelemetry` keeps a started span's.
struct Ids {
    context: SpanContext,
    started: AtomicBool,
}

impl Ids {
    /// The context, for a use that fixes it.
    fn used(&self) -> SpanContext {
        self.started.store(true, Ordering::Relaxed);
        self.context.clone()
    }
}

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
        let inherited = parent.and_then(|p| p.extensions().get::<Ids>().map(Ids::used));
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
            span.extensions_mut().insert(Ids {
                context,
                started: AtomicBool::new(false),
            });
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
    /// below the filter of the layer that gives IDs).
    fn trace_context(&self) -> Context;

    /// The span's trace ID in hex (what orders and log lines show), or
    /// empty when it has none. A read, as [`Self::trace_context`] is.
    fn trace_id(&self) -> String {
        let cx = self.trace_context();
        let context = cx.span().span_context().clone();
        if context.is_valid() {
            context.trace_id().to_string()
        } else {
            String::new()
        }
    }

    /// Makes the span a child of `parent` (a context extracted from a call or
    /// a stored `traceparent`), if `parent` names a valid span and nothing
    /// has used the span's own context yet (a read, or a child): then it
    /// keeps its trace, and this returns false. Under either layer.
    fn adopt_parent(&self, parent: Context) -> bool;
}

impl SpanTraceExt for Span {
    fn trace_context(&self) -> Context {
        let own = with_span_data(self, |data| data.extensions().get::<Ids>().map(Ids::used));
        match own {
            Some(context) => Context::new().with_remote_span_context(context),
            None => OpenTelemetrySpanExt::context(self),
        }
    }

    fn adopt_parent(&self, parent: Context) -> bool {
        let remote = parent.span().span_context().clone();
        if !remote.is_valid() {
            return false;
        }
        let adopted = with_span_data(self, |data| {
            let mut extensions = data.extensions_mut();
            let ids = extensions.get_mut::<Ids>()?;
            if *ids.started.get_mut() {
                return Some(false);
            }
            ids.context = SpanContext::new(
                remote.trace_id(),
                ids.context.span_id(),
                remote.trace_flags(),
                false,
                remote.trace_state().clone(),
            );
            Some(true)
        });
        match adopted {
            Some(adopted) => adopted,
            None => OpenTelemetrySpanExt::set_parent(self, parent).is_ok(),
        }
    }
}

/// Runs `f` on the span's data in the registry, when [`TraceIdsLayer`] is
/// installed (otherwise the span's IDs, if any, are another layer's).
fn with_span_data<T>(
    span: &Span,
    f: impl FnOnce(tracing_subscriber::registry::SpanRef<'_, Registry>) -> Option<T>,
) -> Option<T> {
    let mut f = Some(f);
    span.with_subscriber(|(id, dispatch)| {
        if !dispatch.is::<TraceIdsLayer>() {
            return None;
        }
        let data = dispatch.downcast_ref::<Registry>()?.span(id)?;
        f.take().and_then(|f| f(data))
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

    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_span_adopts_a_remote_parent_and_its_children_follow() {
        with_ids_layer(|| {
            let span = info_span!("server");
            assert!(span.adopt_parent(remote(CALLER)));
            let child = span.in_scope(|| info_span!("handler"));
            for s in [&span, &child] {
                assert_eq!(
                    ids(s).0.to_string(),
                    "4bf92f3577b34da6a3ce929d0e0e4736",
                    "the caller's trace"
                );
            }
            assert_ne!(
                ids(&span).1.to_string(),
                "00f067aa0ba902b7",
                "the span keeps an ID of its own"
            );
            assert_eq!(
                traceparent(&child),
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", ids(&child).1)
            );
            // An unsampled caller's flag is kept, so a service that exports
            // leaves the trace out as the caller asked.
            let unsampled = info_span!("server");
            assert!(unsampled.adopt_parent(remote(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
            )));
            assert!(!ids(&unsampled).2.is_sampled());
        });
    }

    #[test]
    fn a_span_already_read_or_with_a_child_keeps_its_trace() {
        // As tracing-opentelemetry refuses to re-parent a started span: its
        // children, and a context already handed out, would be left behind.
        with_ids_layer(|| {
            let read = info_span!("read first");
            let trace = ids(&read).0;
            assert!(!read.adopt_parent(remote(CALLER)));
            assert_eq!(ids(&read).0, trace);

            let parent = info_span!("parent");
            let child = parent.in_scope(|| info_span!("child"));
            assert!(!parent.adopt_parent(remote(CALLER)));
            assert_eq!(ids(&parent).0, ids(&child).0);
        });
    }

    #[test]
    fn an_invalid_parent_is_ignored_and_a_filtered_span_has_no_context() {
        with_ids_layer(|| {
            let span = info_span!("server");
            assert!(!span.adopt_parent(remote("not a traceparent")));
            assert!(
                span.adopt_parent(remote(CALLER)),
                "and it can still adopt one"
            );

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
            assert!(span.adopt_parent(remote(CALLER)));
            let child = span.in_scope(|| info_span!("handler"));
            assert!(
                !span.adopt_parent(remote(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                )),
                "a started span keeps its trace there too"
            );
            assert_eq!(
                ids(&child).0.to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            assert!(traceparent(&child).starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        });
    }
}
