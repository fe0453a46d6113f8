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
        use tonic::Code;
        let (code, reason) = match &err {
            StockError::UnknownSku { .. } => (Code::NotFound, "UNKNOWN_SKU"),
            StockError::NewSkuIncomplete { .. } => (Code::NotFound, "NEW_SKU_INCOMPLETE"),
            StockError::OutOfStock { .. } => (Code::FailedPrecondition, "OUT_OF_STOCK"),
            StockError::PriceChanged { .. } => (Code::FailedPrecondition, "PRICE_CHANGED"),
            StockError::MixedCurrencies { .. } => (Code::FailedPrecondition, "MIXED_CURRENCIES"),
            StockError::AlreadyReleased { .. } => (Code::FailedPrecondition, "ALREADY_RELEASED"),
            StockError::AlreadyReserved { .. } => (Code::FailedPrecondition, "ALREADY_RESERVED"),
            StockError::Kit(_) => {
                let StockError::Kit(kit) = err else {
                    unreachable!()
                };
                return kit.into();
            }
        };
        svc_kit::error::refusal(code, DOMAIN, reason, err.to_string())
    }
}

/// The `ErrorInfo` domain of this service's refusals.
pub const DOMAIN: &str = "stock.v1";
