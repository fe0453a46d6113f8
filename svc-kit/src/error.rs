//! The outcomes that the kit itself can produce, and how they reach a caller.
//!
//! Every refusal carries, besides its English message, the gRPC richer error
//! model's details (`google.rpc.Status` details, read with `tonic-types`): a
//! malformed field as a `BadRequest` field violation naming its path, and a
//! definite refusal as an `ErrorInfo` with a stable reason (e.g.
//! `INSUFFICIENT_FUNDS`) and its domain (the proto package, e.g. `payment.v1`),
//! so that a client branches on the reason without parsing English.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo` domain of the kit's own refusals (shared by every service).
pub const DOMAIN: &str = "ordersaga";

/// A refusal with a stable `reason` in `domain`, besides its message.
pub fn refusal(code: Code, domain: &str, reason: &str, message: impl Into<String>) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, domain, HashMap::new()),
    )
}

/// An error of the shared service machinery (store, idempotency, validation).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed. Answered INVALID_ARGUMENT, naming the field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },

    /// The `request_id` was already used for a different request.
    #[error(
        "invalid request_id: {request_id:?} was already used for a different {method} request; use a new request_id"
    )]
    RequestIdReused { request_id: String, method: String },

    /// The store is busy or unreachable; the caller may retry.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),

    /// Anything else: a bug or corrupt data. Details go to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A refusal with a stable `reason` that one field of the request caused:
/// its `ErrorInfo` and a `BadRequest` violation naming the field.
pub fn refusal_of_field(
    code: Code,
    domain: &str,
    reason: &str,
    field: impl Into<String>,
    description: impl Into<String>,
    message: impl Into<String>,
) -> Status {
    let mut details = ErrorDetails::with_bad_request_violation(field, description);
    details.set_error_info(reason, domain, HashMap::new());
    Status::with_error_details(code, message, details)
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        if is_transient(&err) {
            Error::StoreUnavailable(err.to_string())
        } else {
            Error::Internal(err.to_string())
        }
    }
}

impl Error {
    /// `err`, or UNAVAILABLE with `raced` when it is a unique key's
    /// violation: a statement that fails whole in a race with another
    /// connection (which wrote the same key first), rather than leave a
    /// part of itself out. A retry hears what won.
    pub fn unless_raced(err: sqlx::Error, raced: impl FnOnce() -> String) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                Error::StoreUnavailable(raced())
            }
            _ => Error::from(err),
        }
    }
}

/// Whether `err` says the connection is gone (closed by the server, cut,
/// or its session ended by an administrator): what ran on it may or may
/// not have committed, and the connection is of no further use.
pub(crate) fn connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("08") || code.starts_with("57P0")
        }
        _ => false,
    }
}

/// Store errors that a retry can cure: a busy or locked database, a serialization
/// conflict or deadlock, a lost or exhausted connection.
fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLite: 5 SQLITE_BUSY, 6 SQLITE_LOCKED (and their extended codes, low byte).
            // PostgreSQL: 40001 serialization failure, 40P01 deadlock, 57P01 admin shutdown,
            // 53300 too many connections, 08xxx connection exceptions.
            let sqlite_busy = code
                .parse::<i32>()
                .map(|c| matches!(c & 0xff, 5 | 6))
                .unwrap_or(false);
            sqlite_busy
                || matches!(code.as_ref(), "40001" | "40P01" | "57P01" | "53300")
                || code.starts_with("08")
        }
        _ => false,
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        match err.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Error::StoreUnavailable(err.to_string())
            }
            _ => Error::Internal(err.to_string()),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match &err {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                err.to_string(),
                ErrorDetails::with_bad_request_violation(field.clone(), reason.clone()),
            ),
            Error::RequestIdReused { .. } => refusal_of_field(
                Code::InvalidArgument,
                DOMAIN,
                "REQUEST_ID_REUSED",
                "request_id",
                "already used for a different request",
                err.to_string(),
            ),
            Error::StoreUnavailable(source) => {
                tracing::warn!(error = %source, "store unavailable");
                Status::unavailable("store temporarily unavailable, retry")
            }
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Codes that are a definite answer: the request was refused for good and had no
/// effect. Such replies are stored with the `request_id`, so a retry gets the same
/// answer. Every other code (UNAVAILABLE, INTERNAL, …) leaves no trace and may be retried.
pub const DEFINITE_REFUSALS: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::AlreadyExists,
    Code::OutOfRange,
];
