//! The OrderService's outcomes, and the one mapping to gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("invalid {field}: unknown sku {sku:?}")]
    UnknownSku { field: String, sku: String },

    #[error(
        "the items are priced in different currencies ({first} and {second}); order them separately"
    )]
    MixedCurrencies { first: String, second: String },

    #[error("cannot price the order: the stock service is unavailable ({0})")]
    PricingUnavailable(String),

    #[error("order {0} not found")]
    NotFound(String),

    #[error("order {order_id} can no longer be cancelled: {reason}")]
    NotCancellable { order_id: String, reason: String },

    #[error("order {order_id} does not need attention: it is {status}")]
    NotResting { order_id: String, status: String },

    #[error("request_id {0:?} was used for another order or another action")]
    ActionRequestIdReused(String),

    #[error(
        "{waiting} orders wait for a free saga slot, the limit (MAX_WAITING_SAGAS); this call recorded nothing: retry with backoff and the same request_id, which also answers with the order if an earlier call made it"
    )]
    Backlogged { waiting: usize },

    #[error(transparent)]
    Kit(#[from] svc_kit::Error),
}

impl From<sqlx::Error> for OrderError {
    fn from(err: sqlx::Error) -> Self {
        OrderError::Kit(err.into())
    }
}

impl From<OrderError> for Status {
    fn from(err: OrderError) -> Self {
        use tonic::Code;
        let (code, reason) = match &err {
            OrderError::UnknownSku { field, .. } => {
                // A field of the request: both a reason and the field's path.
                return svc_kit::error::refusal_of_field(
                    Code::NotFound,
                    DOMAIN,
                    "UNKNOWN_SKU",
                    field.clone(),
                    "unknown sku",
                    err.to_string(),
                );
            }
            OrderError::NotFound(_) => (Code::NotFound, "ORDER_NOT_FOUND"),
            OrderError::MixedCurrencies { .. } => (Code::FailedPrecondition, "MIXED_CURRENCIES"),
            OrderError::NotCancellable { .. } => (Code::FailedPrecondition, "NOT_CANCELLABLE"),
            OrderError::NotResting { .. } => (Code::FailedPrecondition, "NOT_NEEDING_ATTENTION"),
            OrderError::ActionRequestIdReused(_) => (Code::AlreadyExists, "REQUEST_ID_REUSED"),
            OrderError::PricingUnavailable(_) => (Code::Unavailable, "PRICING_UNAVAILABLE"),
            OrderError::Backlogged { .. } => (Code::ResourceExhausted, "TOO_MANY_WAITING_SAGAS"),
            OrderError::Kit(_) => {
                let OrderError::Kit(kit) = err else {
                    unreachable!()
                };
                return kit.into();
            }
        };
        svc_kit::error::refusal(code, DOMAIN, reason, err.to_string())
    }
}

/// The `ErrorInfo` domain of the OrderService's refusals.
pub const DOMAIN: &str = "orders.v1";
