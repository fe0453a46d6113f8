//! The saga's forward calls, each as a batch [`Method`]: `ReserveStock`,
//! `PrepareShipment` and `Charge`, sent as `ReserveStockBatch`,
//! `PrepareShipmentBatch` and `ChargeBatch`. (The compensations, a tenth of
//! the calls or less, go one by one.)

use std::time::Duration;

use futures::future::BoxFuture;
use ordersaga_proto::{
    batch::Item,
    payment::v1::{ChargeBatchItem, ChargeBatchRequest, ChargeRequest, ChargeResponse},
    shipping::v1::{
        PrepareShipmentBatchItem, PrepareShipmentBatchRequest, PrepareShipmentRequest,
        PrepareShipmentResponse,
    },
    stock::v1::{
        ReserveStockBatchItem, ReserveStockBatchRequest, ReserveStockRequest, ReserveStockResponse,
    },
};
use tonic::Status;

use super::{
    HeldSlot, Lane, PaymentClient, ShippingClient, StockClient,
    batch::{Answers, Method, Outgoing},
};

/// Defines one batch method: its lane, its messages, and its two RPCs.
macro_rules! batch_method {
    (
        $name:ident, $client:ty, $request:ty, $reply:ty,
        $batch_request:ident, $batch_item:ident,
        $unary:ident, $batched:ident
    ) => {
        pub struct $name(pub Lane<$client>);

        impl Method for $name {
            type Request = $request;
            type Reply = $reply;

            fn size(&self, request: &$request) -> usize {
                prost::Message::encoded_len(request)
            }

            type Slot = HeldSlot;

            fn slot(&self, budget: Duration) -> BoxFuture<'static, Result<HeldSlot, Status>> {
                let lane = self.0.clone();
                Box::pin(async move { lane.slot(budget).await })
            }

            fn send_batch(
                &self,
                slot: HeldSlot,
                items: Vec<Outgoing<$request>>,
                budget: Duration,
            ) -> BoxFuture<'static, Answers<$reply>> {
                let lane = self.0.clone();
                let message = $batch_request {
                    items: items
                        .into_iter()
                        .map(|item| {
                            $batch_item::from(Item {
                                request: Some(item.request),
                                traceparent: item.traceparent,
                                tracestate: item.tracestate,
                            })
                        })
                        .collect(),
                };
                Box::pin(async move {
                    let answer = lane
                        .call_in(slot, message, budget, |mut c, r| async move {
                            c.$batched(r).await
                        })
                        .await?;
                    Ok(answer.results.into_iter().map(Result::from).collect())
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
    charge,
    charge_batch
);
