//! The batch RPCs' item errors (`ItemError` of each service's package) to
//! and from `tonic::Status`.
//!
//! An item of a batch is answered as its own call would be; when that call
//! would have failed, its status travels as an `ItemError`: the code, the
//! message, and the details as the `grpc-status-details-bin` trailer would
//! carry them. So a client turns it back into the very `Status` the unary
//! call gives, and reads its `ErrorInfo` or `BadRequest` the same way.

use tonic::{Code, Status};

macro_rules! item_error {
    ($($error:ty),* $(,)?) => {$(
        impl From<&Status> for $error {
            fn from(status: &Status) -> Self {
                Self {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: status.details().to_vec(),
                }
            }
        }

        impl From<$error> for Status {
            fn from(error: $error) -> Self {
                // A code this side does not know is not dropped to OK.
                let code = match Code::from_i32(error.code) {
                    Code::Ok => Code::Unknown,
                    code => code,
                };
                Status::with_details(code, error.message, error.details.into())
            }
        }
    )*};
}

item_error!(
    crate::stock::v1::ItemError,
    crate::shipping::v1::ItemError,
    crate::payment::v1::ItemError,
);

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;
    use crate::stock::v1::ItemError;

    #[test]
    fn an_item_error_carries_the_status_and_its_details_both_ways() {
        let status = Status::with_error_details(
            Code::FailedPrecondition,
            "out of stock",
            ErrorDetails::with_error_info(
                "OUT_OF_STOCK",
                "stock.ordersaga",
                std::collections::HashMap::from([("sku".to_owned(), "BOOK".to_owned())]),
            ),
        );
        let error = ItemError::from(&status);
        assert_eq!(error.code, Code::FailedPrecondition as i32);
        let back = Status::from(error);
        assert_eq!(back.code(), Code::FailedPrecondition);
        assert_eq!(back.message(), "out of stock");
        let info = back
            .get_details_error_info()
            .expect("the ErrorInfo survives");
        assert_eq!(info.reason, "OUT_OF_STOCK");
        assert_eq!(info.metadata.get("sku").map(String::as_str), Some("BOOK"));
    }

    #[test]
    fn an_item_error_that_claims_ok_is_no_success() {
        let error = ItemError {
            code: 0,
            message: "odd".into(),
            details: Vec::new(),
        };
        assert_eq!(Status::from(error).code(), Code::Unknown);
    }
}
