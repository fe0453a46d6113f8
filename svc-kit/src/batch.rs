//! Batch RPCs, the server's side: many calls of one method in one request.
//!
//! A batch is a way to carry calls, not a transaction. Each item runs as its
//! own call would, concurrently with the others, so the store's group commit
//! (the batch writer, the shared transaction) takes them in together. Each is
//! answered as its own call would be, in the order of the items: its reply,
//! or the status its call would have ended with, details and all. What the
//! server does per call, it does per item:
//! - a server span, child of the item's own trace context, named as the
//!   item's method (`stock.v1.StockService/ReserveStock`): one order's trace
//!   looks the same whether its calls came alone or in batches;
//! - the `grpc_server_handled` count and latency under that method;
//! - a slot of `MAX_CONCURRENT_CALLS`: the batch's own slot is its first
//!   item's, and each further item takes one or is refused RESOURCE_EXHAUSTED
//!   alone;
//! - the opt-in faults: failed before work, or reply dropped, per item.
//!
//! The layers hand what they keep to the batch through the call's extensions
//! ([`ItemHooks`]); a batch served without them (in a test) runs bare.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Instant};

use futures::{FutureExt, future::join_all};
use tonic::{Extensions, Status};
use tracing::Instrument;

use crate::{Error, fault::FaultSettings, metrics::GrpcMetrics, shed::ShedLayer};

/// Most items in one batch: a batch holds its items' replies in memory at
/// once, and its deadline is theirs.
pub const MAX_ITEMS: usize = 256;

pub use ordersaga_proto::batch::Item;

tokio::task_local! {
    /// How many items the batch being run has (see [`items_in_batch`]).
    static ITEMS: usize;
}

/// How many items the batch RPC that runs the current request has: 1 for a
/// call alone. The requests of a batch of two or more come in the same
/// moment, which is when combining them pays ([`crate::combined`]).
pub fn items_in_batch() -> usize {
    ITEMS.try_with(|items| *items).unwrap_or(1)
}

/// What the server's layers give a batch for its items; each is inserted
/// into the extensions of batch calls only.
#[derive(Clone, Default)]
pub struct ItemHooks {
    pub(crate) metrics: Option<Arc<GrpcMetrics>>,
    pub(crate) shed: Option<ShedLayer>,
    pub(crate) faults: Option<Arc<FaultSettings>>,
}

impl ItemHooks {
    /// The hooks the layers left in `extensions` (each layer adds its own).
    fn of(extensions: &Extensions) -> ItemHooks {
        extensions.get::<ItemHooks>().cloned().unwrap_or_default()
    }
}

/// Runs each item of a batch of `method` (its unary method, as
/// `stock.v1.StockService/ReserveStock`) with `run_one`, and returns their
/// results in order, each as the batch answers it. INVALID_ARGUMENT,
/// nothing run, when the batch has no item or more than [`MAX_ITEMS`].
pub async fn run<I, T, R, O, F, Fut>(
    extensions: &Extensions,
    method: &'static str,
    items: Vec<I>,
    run_one: F,
) -> Result<Vec<O>, Status>
where
    I: Into<Item<T>>,
    O: From<Result<R, Status>>,
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<R, Status>>,
{
    if items.is_empty() {
        return Err(
            Error::invalid("items", format!("is empty; send 1 to {MAX_ITEMS} items")).into(),
        );
    }
    if items.len() > MAX_ITEMS {
        return Err(Error::invalid(
            "items",
            format!(
                "has {} items; at most {MAX_ITEMS} go in one batch",
                items.len()
            ),
        )
        .into());
    }
    let hooks = ItemHooks::of(extensions);
    let run_one = &run_one;
    let count = items.len();
    let runs = items.into_iter().enumerate().map(|(i, item)| {
        let item: Item<T> = item.into();
        let span = crate::propagation::item_span(method, &item.traceparent, &item.tracestate);
        // The batch's own slot is its first item's; each other item takes
        // one now, in order, or is shed.
        let slot = match (&hooks.shed, i) {
            (Some(shed), 1..) => shed.try_take().map(Some),
            _ => Ok(None),
        };
        let hooks = hooks.clone();
        let run = async move {
            let started = Instant::now();
            let result = match (slot, item.request) {
                (Err(shed), _) => Err(shed),
                (Ok(_), None) => Err(Error::invalid("request", "is required").into()),
                (Ok(_slot), Some(request)) => {
                    let work = async {
                        match &hooks.faults {
                            Some(faults) => faults.around_item(method, run_one(request)).await,
                            None => run_one(request).await,
                        }
                    };
                    // A panic fails its own item, as it would its own call,
                    // not its neighbours midway.
                    AssertUnwindSafe(work)
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            tracing::error!(method, "a batch item's handler panicked");
                            Err(Status::internal("the call's handler failed"))
                        })
                }
            };
            if let Some(metrics) = &hooks.metrics {
                let code = match &result {
                    Ok(_) => tonic::Code::Ok,
                    Err(status) => status.code(),
                };
                metrics.record(method, code, started.elapsed());
            }
            O::from(result)
        };
        ITEMS.scope(count, run.instrument(span))
    });
    Ok(join_all(runs).await)
}
