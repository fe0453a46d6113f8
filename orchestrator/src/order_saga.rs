//! The order saga, defined on the generic engine: three steps, each a pair of
//! idempotent calls to a domain service.
//!
//! | # | step | forward | compensation |
//! |---|---|---|---|
//! | 0 | `reserve_stock` | `StockService/ReserveStock` | `StockService/ReleaseStock` |
//! | 1 | `prepare_shipment` | `ShippingService/PrepareShipment` | `ShippingService/CancelShipment` |
//! | 2 | `charge_payment` (pivot) | `PaymentService/Charge` | `PaymentService/Refund` |
//!
//! The forward calls go in batches with the other sagas' (`downstream::batch`),
//! each still answered as its own call.
//!
//! Adding a step means one more `Step` impl and one more line in [`definition`].

use std::sync::Arc;

use async_trait::async_trait;
use ordersaga_proto::{
    payment::v1::{ChargeRequest, RefundRequest},
    shipping::v1::{Address, CancelShipmentRequest, PrepareShipmentRequest, ServiceLevel},
    stock::v1::{OrderLine, ReleaseStockRequest, ReserveStockRequest},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tonic::{Code, Status};
use uuid::Uuid;

use saga_engine::{Announcement, Call, Milestone, SagaDefinition, SagaStatus, Step};

use crate::{
    downstream::{
        Batcher, Downstream, Lane, PaymentClient, ShippingClient, StockClient, batch_methods,
    },
    orders::pricing::Catalogue,
};

pub const KIND: &str = "order";

/// The order saga's steps, in the order they run: [`definition`]'s names,
/// for rendering an order without the definition at hand (the step an order
/// runs now is no record in the log; see `SagaView::running_step`).
pub const STEP_NAMES: [&str; 3] = [RESERVE_STOCK, PREPARE_SHIPMENT, CHARGE_PAYMENT];
const RESERVE_STOCK: &str = "reserve_stock";
const PREPARE_SHIPMENT: &str = "prepare_shipment";
const CHARGE_PAYMENT: &str = "charge_payment";

/// The order, as the saga carries it. Immutable once recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderData {
    pub order_id: Uuid,
    pub request_id: String,
    pub customer_id: String,
    pub items: Vec<PricedItem>,
    pub address: ShippingAddress,
    pub total_cents: i64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricedItem {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippingAddress {
    pub recipient: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

/// The order saga. `catalogue` is the price cache the orders were priced
/// from: the reserve step drops the prices the stock service refuses.
pub fn definition(downstream: Downstream, catalogue: Arc<Catalogue>) -> SagaDefinition<OrderData> {
    let definition = SagaDefinition {
        kind: KIND,
        steps: vec![
            Arc::new(ReserveStock {
                reserve: downstream.reserve_stock,
                stock: downstream.stock,
                catalogue,
            }),
            Arc::new(PrepareShipment {
                prepare: downstream.prepare_shipment,
                shipping: downstream.shipping,
            }),
            Arc::new(ChargePayment {
                charge: downstream.charge,
                payment: downstream.payment,
            }),
        ],
        // Once the charge has begun, the order can no longer be cancelled.
        pivot: Some(CHARGE_PAYMENT),
        span: saga_span,
        announce,
    };
    assert_eq!(
        definition.step_names(),
        STEP_NAMES,
        "the order saga's steps"
    );
    definition
}

/// The order's part of every order event (see docs/events.md).
fn event_fields(order: &OrderData, status: &str, failure_reason: &str) -> Map<String, Value> {
    let mut data = Map::new();
    data.insert("order_id".into(), order.order_id.to_string().into());
    data.insert("customer_id".into(), order.customer_id.clone().into());
    data.insert("status".into(), status.into());
    data.insert("total_cents".into(), order.total_cents.into());
    data.insert("currency".into(), order.currency.clone().into());
    data.insert("failure_reason".into(), failure_reason.into());
    data
}

/// Order events: `order.created` (written with the order itself),
/// `order.completed`, `order.compensated`, `order.cancelled`, `order.failed`
/// `order.needs_attention` and `order.compensation_stuck`.
fn announce(order: &OrderData, milestone: &Milestone<'_>) -> Option<Announcement> {
    match milestone {
        Milestone::Started => Some(Announcement {
            event_type: "order.created".into(),
            data: event_fields(order, SagaStatus::Running.as_str(), ""),
        }),
        Milestone::Finished {
            status,
            failure_reason,
        } => {
            let name = match status {
                SagaStatus::Completed => "order.completed",
                SagaStatus::Compensated => "order.compensated",
                SagaStatus::Cancelled => "order.cancelled",
                SagaStatus::Failed => "order.failed",
                SagaStatus::NeedsAttention => "order.needs_attention",
                SagaStatus::Running | SagaStatus::Compensating => return None,
            };
            Some(Announcement {
                event_type: name.into(),
                data: event_fields(order, status.as_str(), failure_reason),
            })
        }
        Milestone::CompensationStuck {
            step,
            attempts,
            last_error,
        } => {
            let mut data = event_fields(order, SagaStatus::Compensating.as_str(), "");
            data.insert("step".into(), (*step).into());
            data.insert("attempts".into(), (*attempts).into());
            data.insert("last_error".into(), (*last_error).into());
            Some(Announcement {
                event_type: "order.compensation_stuck".into(),
                data,
            })
        }
    }
}

/// The span of an order's saga. Its `trace_id` field puts the trace ID in every
/// log line about the order.
fn saga_span(order_id: Uuid) -> tracing::Span {
    tracing::info_span!(
        "saga",
        otel.name = "order saga",
        order_id = %order_id,
        trace_id = tracing::field::Empty,
        resumed = tracing::field::Empty,
    )
}

struct ReserveStock {
    /// The reservations, batched.
    reserve: Batcher<batch_methods::ReserveStock>,
    /// The releases, one by one.
    stock: Lane<StockClient>,
    catalogue: Arc<Catalogue>,
}

#[async_trait]
impl Step<OrderData> for ReserveStock {
    fn name(&self) -> &'static str {
        RESERVE_STOCK
    }

    async fn forward(&self, order: &OrderData, call: &Call) -> Result<String, Status> {
        let lines = order
            .items
            .iter()
            .map(|i| OrderLine {
                sku: i.sku.clone(),
                quantity: i.quantity,
                // The stock service refuses the reservation if the catalogue
                // no longer has this price (see orders::pricing).
                expected_unit_price_cents: i.unit_price_cents,
                expected_currency: order.currency.clone(),
            })
            .collect();
        let message = ReserveStockRequest {
            request_id: call.request_id.clone(),
            order_id: order.order_id.to_string(),
            lines,
        };
        let reply = match self.reserve.call(message, call.timeout).await {
            Ok(reply) => reply,
            Err(status) => {
                if status.code() == Code::FailedPrecondition {
                    // Perhaps a price changed: the next order asks afresh.
                    self.catalogue
                        .forget(order.items.iter().map(|i| i.sku.as_str()));
                }
                return Err(status);
            }
        };
        Ok(format!("reservation {}", reply.reservation_id))
    }

    async fn compensate(&self, order: &OrderData, call: &Call) -> Result<String, Status> {
        let message = ReleaseStockRequest {
            request_id: call.request_id.clone(),
            order_id: order.order_id.to_string(),
        };
        let reply = self
            .stock
            .call(message, call.timeout, |mut c, r| async move {
                c.release_stock(r).await
            })
            .await?;
        Ok(if reply.released_reservation {
            "stock released"
        } else {
            "nothing was reserved"
        }
        .into())
    }
}

struct PrepareShipment {
    /// The preparations, batched.
    prepare: Batcher<batch_methods::PrepareShipment>,
    /// The cancellations, one by one.
    shipping: Lane<ShippingClient>,
}

#[async_trait]
impl Step<OrderData> for PrepareShipment {
    fn name(&self) -> &'static str {
        PREPARE_SHIPMENT
    }

    async fn forward(&self, order: &OrderData, call: &Call) -> Result<String, Status> {
        let a = &order.address;
        let message = PrepareShipmentRequest {
            request_id: call.request_id.clone(),
            order_id: order.order_id.to_string(),
            address: Some(Address {
                recipient: a.recipient.clone(),
                line1: a.line1.clone(),
                city: a.city.clone(),
                postal_code: a.postal_code.clone(),
                country: a.country.clone(),
            }),
            service_level: ServiceLevel::Standard as i32,
            item_count: order.items.iter().map(|i| i.quantity).sum(),
        };
        let reply = self.prepare.call(message, call.timeout).await?;
        let tracking = reply.shipment.map(|s| s.tracking_id).unwrap_or_default();
        Ok(format!("tracking {tracking}"))
    }

    async fn compensate(&self, order: &OrderData, call: &Call) -> Result<String, Status> {
        let message = CancelShipmentRequest {
            request_id: call.request_id.clone(),
            order_id: order.order_id.to_string(),
        };
        let reply = self
            .shipping
            .call(message, call.timeout, |mut c, r| async move {
                c.cancel_shipment(r).await
            })
            .await?;
        Ok(if reply.cancelled_shipment {
            "shipment cancelled"
        } else {
            "no shipment to cancel"
        }
        .into())
    }
}

struct ChargePayment {
    /// The charges, batched.
    charge: Batcher<batch_methods::Charge>,
    /// The refunds, one by one.
    payment: Lane<PaymentClient>,
}

#[async_trait]
impl Step<OrderData> for ChargePayment {
    fn name(&self) -> &'static str {
        CHARGE_PAYMENT
    }

    async fn forward(&self, order: &OrderData, call: &Call) -> Result<String, Status> {
        let message = ChargeRequest {
            request_id: call.request_id.clone(),
            order_id: order.order_id.to_string(),
            customer_id: order.customer_id.clone(),
            amount_cents: order.total_cents,
            currency: order.currency.clone(),
        };
        let reply = self.charge.call(message, call.timeout).await?;
        Ok(format!("payment {}", reply.payment_id))
    }

    async fn compensate(&self, order: &OrderData, call: &Call) -> Result<String, Status> {
        let message = RefundRequest {
            request_id: call.request_id.clone(),
            order_id: order.order_id.to_string(),
        };
        let reply = self
            .payment
            .call(message, call.timeout, |mut c, r| async move {
                c.refund(r).await
            })
            .await?;
        Ok(if reply.refunded_charge {
            format!("refunded {} cents", reply.amount_cents)
        } else {
            "nothing was charged".into()
        })
    }
}
