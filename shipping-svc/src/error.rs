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
        match err {
            ShippingError::NoShipment { .. } => Status::not_found(err.to_string()),
            ShippingError::CountryNotServed { .. }
            | ShippingError::AlreadyCancelled { .. }
            | ShippingError::AlreadyPrepared { .. } => Status::failed_precondition(err.to_string()),
            ShippingError::Kit(kit) => kit.into(),
        }
    }
}
