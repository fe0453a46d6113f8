//! The stock service's outcomes, and the one mapping to gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum StockError {
    #[error("unknown sku {sku:?}")]
    UnknownSku { sku: String },

    #[error("out of stock: sku {sku:?} has {available} available, {requested} requested")]
    OutOfStock {
        sku: String,
        available: i64,
        requested: i64,
    },

    #[error(
        "price changed: sku {sku:?} costs {actual_cents} {actual_currency} now, the order was priced at {expected_cents} {expected_currency}; place the order again"
    )]
    PriceChanged {
        sku: String,
        expected_cents: i64,
        expected_currency: String,
        actual_cents: i64,
        actual_currency: String,
    },

    #[error("the order's lines are priced in different currencies ({first} and {second})")]
    MixedCurrencies { first: String, second: String },

    #[error("order {order_id} was released before it was reserved; a late ReserveStock is refused")]
    AlreadyReleased { order_id: String },

    #[error("order {order_id} already holds reservation {reservation_id}")]
    AlreadyReserved {
        order_id: String,
        reservation_id: String,
    },

    #[error("unknown sku {sku:?}; to create it, also give name, unit_price_cents and currency")]
    NewSkuIncomplete { sku: String },

    #[error(transparent)]
    Kit(#[from] svc_kit::Error),
}

impl From<sqlx::Error> for StockError {
    fn from(err: sqlx::Error) -> Self {
        StockError::Kit(err.into())
    }
}

impl From<rusqlite::Error> for StockError {
    fn from(err: rusqlite::Error) -> Self {
        StockError::Kit(err.into())
    }
}

impl From<StockError> for Status {
    fn from(err: StockError) -> Self {
        match err {
            StockError::UnknownSku { .. } | StockError::NewSkuIncomplete { .. } => {
                Status::not_found(err.to_string())
            }
            StockError::OutOfStock { .. }
            | StockError::PriceChanged { .. }
            | StockError::MixedCurrencies { .. }
            | StockError::AlreadyReleased { .. }
            | StockError::AlreadyReserved { .. } => Status::failed_precondition(err.to_string()),
            StockError::Kit(kit) => kit.into(),
        }
    }
}
