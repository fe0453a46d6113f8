//! The payment service's outcomes, and the one mapping to gRPC statuses.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("unknown account {customer_id:?}")]
    UnknownAccount { customer_id: String },

    #[error(
        "insufficient funds: account {customer_id:?} has {balance_cents} cents, the charge needs {amount_cents}"
    )]
    InsufficientFunds {
        customer_id: String,
        balance_cents: i64,
        amount_cents: i64,
    },

    #[error(
        "currency mismatch: account {customer_id:?} is in {account}, the request is in {requested}"
    )]
    CurrencyMismatch {
        customer_id: String,
        account: String,
        requested: String,
    },

    #[error("order {order_id} was refunded before it was charged; a late Charge is refused")]
    AlreadyRefunded { order_id: String },

    #[error("order {order_id} was already charged by payment {payment_id}")]
    AlreadyCharged {
        order_id: String,
        payment_id: String,
    },

    #[error(transparent)]
    Kit(#[from] svc_kit::Error),
}

impl From<sqlx::Error> for PaymentError {
    fn from(err: sqlx::Error) -> Self {
        PaymentError::Kit(err.into())
    }
}

impl From<rusqlite::Error> for PaymentError {
    fn from(err: rusqlite::Error) -> Self {
        PaymentError::Kit(err.into())
    }
}

impl From<PaymentError> for Status {
    fn from(err: PaymentError) -> Self {
        use tonic::Code;
        let (code, reason) = match &err {
            PaymentError::UnknownAccount { .. } => (Code::NotFound, "UNKNOWN_ACCOUNT"),
            PaymentError::InsufficientFunds { .. } => {
                (Code::FailedPrecondition, "INSUFFICIENT_FUNDS")
            }
            PaymentError::CurrencyMismatch { .. } => {
                (Code::FailedPrecondition, "CURRENCY_MISMATCH")
            }
            PaymentError::AlreadyRefunded { .. } => (Code::FailedPrecondition, "ALREADY_REFUNDED"),
            PaymentError::AlreadyCharged { .. } => (Code::FailedPrecondition, "ALREADY_CHARGED"),
            PaymentError::Kit(_) => {
                let PaymentError::Kit(kit) = err else {
                    unreachable!()
                };
                return kit.into();
            }
        };
        svc_kit::error::refusal(code, DOMAIN, reason, err.to_string())
    }
}

/// The `ErrorInfo` domain of this service's refusals.
pub const DOMAIN: &str = "payment.v1";
