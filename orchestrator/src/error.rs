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
        "{waiting} orders wait for a free saga slot, the limit (MAX_WAITING_SAGAS); nothing was recorded, retry with backoff"
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
        match err {
            OrderError::UnknownSku { .. } | OrderError::NotFound(_) => {
                Status::not_found(err.to_string())
            }
            OrderError::MixedCurrencies { .. }
            | OrderError::NotCancellable { .. }
            | OrderError::NotResting { .. } => Status::failed_precondition(err.to_string()),
            OrderError::ActionRequestIdReused(_) => Status::already_exists(err.to_string()),
            OrderError::PricingUnavailable(_) => Status::unavailable(err.to_string()),
            OrderError::Backlogged { .. } => Status::resource_exhausted(err.to_string()),
            OrderError::Kit(kit) => kit.into(),
        }
    }
}
