//! Who may see and act: the API's own keys, in the `x-api-key` header. The
//! page sends the key it was given at sign-in; a reverse proxy in front may
//! set the header itself instead (then the page needs no sign-in).
//!
//! Unlike the gRPC API, where each scope opens only its own RPCs, the admin
//! key also reads here: an operator acts on what they see, with one key.

use axum::http::HeaderMap;
use svc_kit::auth::{API_KEY_HEADER, Keys};

use super::reply::Refusal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The business key: lists, sagas, live views.
    Read,
    /// The admin key: all of that, and the operator actions.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// The scope of the request's key, or the refusal: 401 without a key or
/// with a wrong one.
pub fn scope(keys: &Keys, headers: &HeaderMap) -> Result<Scope, Refusal> {
    let Some(key) = headers.get(API_KEY_HEADER) else {
        return Err(Refusal::unauthenticated(
            "API_KEY_MISSING",
            "missing x-api-key header: sign in with the business key (APPLICATION_API_KEY) or the admin key (ADMIN_API_KEY)",
        ));
    };
    let key = key.as_bytes();
    // Both sets are checked, whichever matches, so the time taken does not
    // tell which scope a key has.
    let (admin, business) = (keys.admin.contains(key), keys.business.contains(key));
    if admin {
        Ok(Scope::Admin)
    } else if business {
        Ok(Scope::Read)
    } else {
        Err(Refusal::unauthenticated(
            "API_KEY_INVALID",
            "x-api-key does not match",
        ))
    }
}

/// Operator actions take the admin key: 403 with the business key.
pub fn require_admin(keys: &Keys, headers: &HeaderMap) -> Result<(), Refusal> {
    match scope(keys, headers)? {
        Scope::Admin => Ok(()),
        Scope::Read if keys.admin.is_empty() => Err(Refusal::forbidden(
            "ADMIN_RPCS_OFF",
            "actions are off on this orchestrator: it has no admin key (set ADMIN_API_KEY)",
        )),
        Scope::Read => Err(Refusal::forbidden(
            "ADMIN_KEY_REQUIRED",
            "x-api-key holds the business key, which only reads; actions take the admin key (ADMIN_API_KEY)",
        )),
    }
}
