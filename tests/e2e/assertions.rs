//! Assertions on gRPC outcomes.

use tonic::{Code, Response, Status};

/// Asserts the call failed with `code` and a message containing each of `needles`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<Response<T>, Status>,
    code: Code,
    needles: &[&str],
) {
    match result {
        Ok(reply) => panic!("expected {code:?}, got a reply: {:?}", reply.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), code, "unexpected status: {status:?}");
            for needle in needles {
                assert!(
                    status.message().contains(needle),
                    "message {:?} should mention {needle:?}",
                    status.message()
                );
            }
        }
    }
}

/// A fresh order ID.
pub fn order_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A fresh request ID.
pub fn request_id() -> String {
    format!("req-{}", uuid::Uuid::new_v4().simple())
}
