//! The saga's forward calls, each as a batch [`Method`]: `ReserveStock`,
//! `PrepareShipment` and `Charge`, sent as `ReserveStockBatch`,
//! `PrepareShipmentBatch` and `ChargeBatch`. (The compensations, a tenth of
//! the calls or less, go one by one.)

use std::time::Duration;

use futures::future::BoxFuture;
use ordersaga_proto::{
    payment::v1::{
        ChargeBatchItem, ChargeBatchRequest, ChargeRequest, ChargeResponse, charge_batch_result,
    },
    shipping::v1::{
        PrepareShipmentBatchItem, PrepareShipmentBatchRequest, PrepareShipmentRequest,
        PrepareShipmentResponse, prepare_shipment_batch_result,
    },
    stock::v1::{
        ReserveStockBatchItem, ReserveStockBatchRequest, ReserveStockRequest, ReserveStockResponse,
        reserve_stock_batch_result,
    },
};
use tonic::Status;

use super::{
    Lane, PaymentClient, ShippingClient, StockClient,
    batch::{Answers, Method, Outgoing},
};

/// An item of a batch answer without its outcome: a service that sent it is
/// broken, and the call's outcome unknown.
fn no_outcome() -> Status {
    Status::internal("the service's batch answer has an item without its outcome")
}

/// Defines one batch method: its lane, its messages, and its two RPCs.
macro_rules! batch_method {
    (
        $name:ident, $client:ty, $request:ty, $reply:ty,
        $batch_request:ident, $batch_item:ident, $outcome:path,
        $unary:ident, $batched:ident
    ) => {
        pub struct $name(pub Lane<$client>);

        impl Method for $name {
            type Request = $request;
            type Reply = $reply;

            fn size(&self, request: &$request) -> usize {
                prost::Message::encoded_len(request)
            }

            fn send_batch(
                &self,
                items: Vec<Outgoing<$request>>,
                budget: Duration,
            ) -> BoxFuture<'static, Answers<$reply>> {
                let lane = self.0.clone();
                let message = $batch_request {
                    items: items
                        .into_iter()
                        .map(|item| $batch_item {
                            request: Some(item.request),
                            traceparent: item.traceparent,
                            tracestate: item.tracestate,
                        })
                        .collect(),
                };
                Box::pin(async move {
                    let answer = lane
                        .call(
                            message,
                            budget,
                            |mut c, r| async move { c.$batched(r).await },
                        )
                        .await?;
                    Ok(answer
                        .results
                        .into_iter()
                        .map(|result| {
                            use $outcome as Outcome;
                            match result.outcome {
                                Some(Outcome::Reply(reply)) => Ok(reply),
                                Some(Outcome::Error(error)) => Err(error.into()),
                                None => Err(no_outcome()),
                            }
                        })
                        .collect())
                })
            }

            fn send_one(
                &self,
                request: $request,
                timeout: Duration,
            ) -> BoxFuture<'static, Result<$reply, Status>> {
                let lane = self.0.clone();
                Box::pin(async move {
                    lane.call(
                        request,
                        timeout,
                        |mut c, r| async move { c.$unary(r).await },
                    )
                    .await
                })
            }
        }
    };
}

batch_method!(
    ReserveStock,
    StockClient,
    ReserveStockRequest,
    ReserveStockResponse,
    ReserveStockBatchRequest,
    ReserveStockBatchItem,
    reserve_stock_batch_result::Outcome,
    reserve_stock,
    reserve_stock_batch
);

batch_method!(
    PrepareShipment,
    ShippingClient,
    PrepareShipmentRequest,
    PrepareShipmentResponse,
    PrepareShipmentBatchRequest,
    PrepareShipmentBatchItem,
    prepare_shipment_batch_result::Outcome,
    prepare_shipment,
    prepare_shipment_batch
);

batch_method!(
    Charge,
    PaymentClient,
    ChargeRequest,
    ChargeResponse,
    ChargeBatchRequest,
    ChargeBatchItem,
    charge_batch_result::Outcome,
    charge,
    charge_batch
);
