//! The shipping service's outcomes, and the one mapping to gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ShippingError {
    #[error("we do not ship to {country}")]
    CountryNotServed { country: String },

    #[error(
        "order {order_id}'s shipment was cancelled before it was prepared; a late PrepareShipment is refused"
    )]
    AlreadyCancelled { order_id: String },

    #[error("order {order_id} already has shipment {shipment_id}")]
    AlreadyPrepared {
        order_id: String,
        shipment_id: String,
    },

    #[error("no shipment for order {order_id}")]
    NoShipment { order_id: String },

    #[error(transparent)]
    Kit(#[from] svc_kit::Error),
}

impl From<sqlx::Error> for ShippingError {
    fn from(err: sqlx::Error) -> Self {
        ShippingError::Kit(err.into())
    }
}

impl From<rusqlite::Error> for ShippingError {
    fn from(err: rusqlite::Error) -> Self {
        ShippingError::Kit(err.into())
    }
}

impl From<ShippingError> for Status {
    fn from(err: ShippingError) -> Self {
        use tonic::Code;
        let (code, reason) = match &err {
            ShippingError::NoShipment { .. } => (Code::NotFound, "NO_SHIPMENT"),
            ShippingError::CountryNotServed { .. } => {
                (Code::FailedPrecondition, "COUNTRY_NOT_SERVED")
            }
            ShippingError::AlreadyCancelled { .. } => {
                (Code::FailedPrecondition, "ALREADY_CANCELLED")
            }
            ShippingError::AlreadyPrepared { .. } => (Code::FailedPrecondition, "ALREADY_PREPARED"),
            ShippingError::Kit(_) => {
                let ShippingError::Kit(kit) = err else {
                    unreachable!()
                };
                return kit.into();
            }
        };
        svc_kit::error::refusal(code, DOMAIN, reason, err.to_string())
    }
}

/// The `ErrorInfo` domain of this service's refusals.
pub const DOMAIN: &str = "shipping.v1";
