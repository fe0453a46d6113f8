//! The explorer's answers: JSON bodies, and refusals carrying the gRPC
//! API's own code and message, with the HTTP status that matches it.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tonic::{Code, Status};

/// A JSON answer with status 200.
pub fn json(body: &Value) -> Response {
    with_status(StatusCode::OK, body)
}

fn with_status(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // Orders are not for shared caches, nor for the browser's disk.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A refused request: `{"code": "NOT_FOUND", "message": "…"}`, with the
/// stable `reason` of the refusal's ErrorInfo when it has one (as gRPC
/// clients read it; see docs/sdks.md).
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    reason: Option<String>,
}

impl Refusal {
    pub fn unauthenticated(reason: &str, message: &str) -> Self {
        Refusal::new(Code::Unauthenticated, message).because(reason)
    }

    pub fn forbidden(reason: &str, message: &str) -> Self {
        Refusal::new(Code::PermissionDenied, message).because(reason)
    }

    /// With a stable reason, as the gRPC API gives it.
    pub fn because(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_owned());
        self
    }

    /// A malformed request, naming what is wrong.
    pub fn invalid(message: impl Into<String>) -> Self {
        Refusal::new(Code::InvalidArgument, message)
    }

    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            status: http_status(code),
            code: code_name(code),
            message: message.into(),
            reason: None,
        }
    }

    pub fn body(&self) -> Value {
        match &self.reason {
            Some(reason) => json!({ "code": self.code, "message": self.message, "reason": reason }),
            None => json!({ "code": self.code, "message": self.message }),
        }
    }
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        let refusal = Refusal::new(status.code(), status.message());
        match ordersaga_proto::errors::refusal(&status) {
            Some(found) => refusal.because(found.reason.as_str()),
            None => refusal,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        with_status(self.status, &self.body())
    }
}

/// The HTTP status of a gRPC code, as Google's API mapping has it.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
