//! The `x-api-key` check on business RPCs.
//!
//! It is an interceptor on each business service, not a server-wide layer, so
//! health and reflection stay open: `grpcurl list` works without a key.

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

pub const API_KEY_HEADER: &str = "x-api-key";

#[derive(Clone)]
pub struct ApiKeyCheck {
    expected: Arc<[u8]>,
}

impl ApiKeyCheck {
    pub fn new(key: &str) -> Self {
        ApiKeyCheck {
            expected: Arc::from(key.as_bytes()),
        }
    }
}

impl Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get(API_KEY_HEADER) {
            None => Err(Status::unauthenticated(
                "missing x-api-key metadata: send the service's API key",
            )),
            Some(given) if constant_time_eq(given.as_bytes(), &self.expected) => Ok(request),
            Some(_) => Err(Status::unauthenticated("x-api-key does not match")),
        }
    }
}

/// Compares without an early exit, so response time does not leak how much of
/// a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_missing_wrong_and_accepts_right_key() {
        let mut check = ApiKeyCheck::new("s3cret");
        assert_eq!(
            check.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(API_KEY_HEADER, "s3creT".parse().unwrap());
        assert_eq!(
            check.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut right = Request::new(());
        right
            .metadata_mut()
            .insert(API_KEY_HEADER, "s3cret".parse().unwrap());
        assert!(check.call(right).is_ok());
    }
}
