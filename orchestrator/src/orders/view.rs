//! Renders the saga log as the public `Order` message.

use ordersaga_proto::Timestamp;
use ordersaga_proto::orders::v1::{self as pb, OrderStatus, StepPhase, StepStatus as PbStepStatus};

use saga_engine::{Phase, SagaStatus, SagaView, StepStatus};

use crate::order_saga::{OrderData, STEP_NAMES};

pub fn order_status(status: SagaStatus) -> OrderStatus {
    match status {
        SagaStatus::Running => OrderStatus::Running,
        SagaStatus::Compensating => OrderStatus::Compensating,
        SagaStatus::Completed => OrderStatus::Completed,
        SagaStatus::Compensated => OrderStatus::Compensated,
        SagaStatus::Cancelled => OrderStatus::Cancelled,
        SagaStatus::Failed => OrderStatus::Failed,
        SagaStatus::NeedsAttention => OrderStatus::NeedsAttention,
    }
}

pub fn saga_status(status: OrderStatus) -> Option<SagaStatus> {
    match status {
        OrderStatus::Unspecified | OrderStatus::Pending => None,
        OrderStatus::Running => Some(SagaStatus::Running),
        OrderStatus::Completed => Some(SagaStatus::Completed),
        OrderStatus::Compensating => Some(SagaStatus::Compensating),
        OrderStatus::Compensated => Some(SagaStatus::Compensated),
        OrderStatus::Cancelled => Some(SagaStatus::Cancelled),
        OrderStatus::Failed => Some(SagaStatus::Failed),
        OrderStatus::NeedsAttention => Some(SagaStatus::NeedsAttention),
    }
}

fn step_status(status: StepStatus) -> PbStepStatus {
    match status {
        StepStatus::Running => PbStepStatus::Running,
        StepStatus::Succeeded => PbStepStatus::Succeeded,
        StepStatus::Failed => PbStepStatus::Failed,
        StepStatus::Unknown => PbStepStatus::Unknown,
        StepStatus::Skipped => PbStepStatus::Skipped,
    }
}

pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The trace ID inside a W3C `traceparent` (`00-<trace-id>-<span-id>-<flags>`).
pub fn trace_id(traceparent: &str) -> String {
    traceparent.split('-').nth(1).unwrap_or_default().to_owned()
}

pub fn order(order: &OrderData, saga: &SagaView) -> pb::Order {
    pb::Order {
        order_id: order.order_id.to_string(),
        request_id: order.request_id.clone(),
        customer_id: order.customer_id.clone(),
        items: order
            .items
            .iter()
            .map(|i| pb::PricedItem {
                sku: i.sku.clone(),
                quantity: i.quantity,
                unit_price_cents: i.unit_price_cents,
                line_total_cents: i.unit_price_cents * i.quantity,
            })
            .collect(),
        shipping_address: Some(pb::ShippingAddress {
            recipient: order.address.recipient.clone(),
            line1: order.address.line1.clone(),
            city: order.address.city.clone(),
            postal_code: order.address.postal_code.clone(),
            country: order.address.country.clone(),
        }),
        total_cents: order.total_cents,
        currency: order.currency.clone(),
        status: order_status(saga.status) as i32,
        failure_reason: saga.failure_reason.clone(),
        steps: saga
            .steps
            .iter()
            .chain(saga.running_step(&STEP_NAMES).as_ref())
            .map(|s| pb::Step {
                name: s.name.clone(),
                phase: match s.phase {
                    Phase::Forward => StepPhase::Forward,
                    Phase::Compensation => StepPhase::Compensation,
                } as i32,
                status: step_status(s.status) as i32,
                attempts: s.attempts as i32,
                last_error: s.last_error.clone(),
                started_at: s.started_at_ms.map(timestamp),
                finished_at: s.finished_at_ms.map(timestamp),
                result: s.output.clone(),
            })
            .collect(),
        created_at: Some(timestamp(saga.created_at_ms)),
        updated_at: Some(timestamp(saga.updated_at_ms)),
        trace_id: trace_id(&saga.trace_context),
    }
}
