//! The batch RPCs' items and results, one shape for every method: an
//! [`Item`] is a call as its batch carries it, and a result is what the call
//! alone would have answered, `Result<Reply, Status>`.
//!
//! The item errors (`ItemError` of each service's package) go to and from
//! `tonic::Status`.
//!
//! An item of a batch is answered as its own call would be; when that call
//! would have failed, its status travels as an `ItemError`: the code, the
//! message, and the details as the `grpc-status-details-bin` trailer would
//! carry them. So a client turns it back into the very `Status` the unary
//! call gives, and reads its `ErrorInfo` or `BadRequest` the same way.

use tonic::{Code, Status};

/// One call as a batch carries it, whatever its method.
#[derive(Debug, Clone, PartialEq)]
pub struct Item<T> {
    /// `None`: the item came without its request.
    pub request: Option<T>,
    /// The caller's W3C trace context; empty for none.
    pub traceparent: String,
    pub tracestate: String,
}

/// For each batch method: its items to and from [`Item`], and its results
/// to and from what the call alone answers.
macro_rules! batch_method {
    ($($module:ident: $item:ident($request:ident) -> $result:ident($reply:ident), $outcome:ident;)*) => {$(
        impl From<crate::$module::v1::$item> for Item<crate::$module::v1::$request> {
            fn from(item: crate::$module::v1::$item) -> Self {
                Item {
                    request: item.request,
                    traceparent: item.traceparent,
                    tracestate: item.tracestate,
                }
            }
        }

        impl From<Item<crate::$module::v1::$request>> for crate::$module::v1::$item {
            fn from(item: Item<crate::$module::v1::$request>) -> Self {
                Self {
                    request: item.request,
                    traceparent: item.traceparent,
                    tracestate: item.tracestate,
                }
            }
        }

        impl From<Result<crate::$module::v1::$reply, Status>> for crate::$module::v1::$result {
            fn from(result: Result<crate::$module::v1::$reply, Status>) -> Self {
                use crate::$module::v1::$outcome::Outcome;
                Self {
                    outcome: Some(match result {
                        Ok(reply) => Outcome::Reply(reply),
                        Err(status) => Outcome::Error((&status).into()),
                    }),
                }
            }
        }

        impl From<crate::$module::v1::$result> for Result<crate::$module::v1::$reply, Status> {
            fn from(result: crate::$module::v1::$result) -> Self {
                use crate::$module::v1::$outcome::Outcome;
                match result.outcome {
                    Some(Outcome::Reply(reply)) => Ok(reply),
                    Some(Outcome::Error(error)) => Err(error.into()),
                    // A service that sent it is broken; the call's outcome
                    // is unknown.
                    None => Err(Status::internal(
                        "the service's batch answer has an item without its outcome",
                    )),
                }
            }
        }
    )*};
}

batch_method! {
    stock: ReserveStockBatchItem(ReserveStockRequest)
        -> ReserveStockBatchResult(ReserveStockResponse), reserve_stock_batch_result;
    shipping: PrepareShipmentBatchItem(PrepareShipmentRequest)
        -> PrepareShipmentBatchResult(PrepareShipmentResponse), prepare_shipment_batch_result;
    payment: ChargeBatchItem(ChargeRequest) -> ChargeBatchResult(ChargeResponse), charge_batch_result;
}

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

    #[test]
    fn a_result_goes_both_ways_and_one_without_its_outcome_is_no_answer() {
        use crate::stock::v1::{ReserveStockBatchResult, ReserveStockResponse};
        let reply = ReserveStockResponse {
            reservation_id: "r-1".into(),
            ..Default::default()
        };
        let result = ReserveStockBatchResult::from(Ok(reply.clone()));
        assert_eq!(Result::from(result).ok(), Some(reply));
        let refused = ReserveStockBatchResult::from(Err(Status::not_found("KIWI")));
        let status = Result::<ReserveStockResponse, Status>::from(refused).unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::NotFound, "KIWI"));
        let empty = ReserveStockBatchResult { outcome: None };
        let status = Result::<ReserveStockResponse, Status>::from(empty).unwrap_err();
        assert_eq!(status.code(), Code::Internal, "an unknown outcome, retried");
    }
}
