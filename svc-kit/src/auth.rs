//! The `x-api-key` check, with two scopes: business RPCs take a business
//! key, admin RPCs (stock and money put in by hand) an admin key.
//!
//! Each scope is a set of keys, so a key is rotated without downtime: add the
//! new one, move the clients, drop the old one. It is a layer in front of
//! each business service, not server-wide, so health and reflection stay
//! open: `grpcurl list` works without a key. It must see the method's path,
//! which a tonic interceptor is not given, hence a tower service.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Code, Status, server::NamedService};

use crate::error::{DOMAIN, refusal};
use tower::Service;

pub const API_KEY_HEADER: &str = "x-api-key";

/// The methods that take an admin key. Operator RPCs join this list.
pub const ADMIN_METHODS: &[&str] = &[
    "/stock.v1.StockService/Restock",
    "/payment.v1.PaymentService/Deposit",
    "/orders.v1.OrderService/RetryCompensation",
    "/orders.v1.OrderService/ResolveCompensation",
];

/// The keys `devstack` and the README use. Anyone can guess them: they are
/// the only keys shorter than [`MIN_KEY_LEN`] a service accepts, and it warns
/// at start-up when it runs with one.
pub const DEV_KEYS: &[&str] = &["dev-key", "dev-admin-key"];

/// A key anyone could guess in a day is no key.
pub const MIN_KEY_LEN: usize = 32;

/// A set of keys of one scope, kept as SHA-256 digests: comparing digests of
/// equal length hides the length of the keys, and `subtle` hides how much of
/// a guess was right.
#[derive(Clone, Default)]
pub struct KeySet {
    digests: Arc<[[u8; 32]]>,
}

impl KeySet {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        KeySet {
            digests: keys.into_iter().map(digest).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `given` is one of the keys. Every key is compared, matched or
    /// not, so the time taken says nothing about which one (or none) it was.
    pub fn contains(&self, given: &[u8]) -> bool {
        let given = digest_bytes(given);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&given)
            })
            .into()
    }
}

fn digest(key: &str) -> [u8; 32] {
    digest_bytes(key.as_bytes())
}

fn digest_bytes(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// The keys a service accepts, by scope.
#[derive(Clone)]
pub struct Keys {
    pub business: KeySet,
    pub admin: KeySet,
}

impl Keys {
    /// What `key` may call `path` with: `Ok` or the refusal.
    fn check(&self, path: &str, key: Option<&[u8]>) -> Result<(), Status> {
        let Some(key) = key else {
            return Err(refusal(
                Code::Unauthenticated,
                DOMAIN,
                "API_KEY_MISSING",
                "missing x-api-key metadata: send the service's API key",
            ));
        };
        let admin_method = ADMIN_METHODS.contains(&path);
        let (is_business, is_admin) = (self.business.contains(key), self.admin.contains(key));
        match (admin_method, is_business, is_admin) {
            (false, true, _) | (true, _, true) => Ok(()),
            (true, true, false) if self.admin.is_empty() => Err(refusal(
                Code::PermissionDenied,
                DOMAIN,
                "ADMIN_RPCS_OFF",
                "admin RPCs are off on this service: it has no admin key (set ADMIN_API_KEY)",
            )),
            (true, true, false) => Err(refusal(
                Code::PermissionDenied,
                DOMAIN,
                "ADMIN_KEY_REQUIRED",
                "x-api-key holds a business key; this RPC takes an admin key (ADMIN_API_KEY)",
            )),
            (false, false, true) => Err(refusal(
                Code::PermissionDenied,
                DOMAIN,
                "BUSINESS_KEY_REQUIRED",
                "x-api-key holds an admin key; business RPCs take a business key (APPLICATION_API_KEY)",
            )),
            (_, false, false) => Err(refusal(
                Code::Unauthenticated,
                DOMAIN,
                "API_KEY_INVALID",
                "x-api-key does not match",
            )),
        }
    }
}

/// The business service behind the key check.
#[derive(Clone)]
pub struct RequireKey<S> {
    inner: S,
    keys: Keys,
}

impl<S> RequireKey<S> {
    pub fn new(inner: S, keys: Keys) -> Self {
        RequireKey { inner, keys }
    }
}

impl<S: NamedService> NamedService for RequireKey<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for RequireKey<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let key = request
            .headers()
            .get(API_KEY_HEADER)
            .map(|value| value.as_bytes());
        match self.keys.check(request.uri().path(), key) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOCK_QUERY: &str = "/stock.v1.StockService/GetProduct";
    const RESTOCK: &str = "/stock.v1.StockService/Restock";

    fn keys() -> Keys {
        Keys {
            business: KeySet::new(["new-business", "old-business"]),
            admin: KeySet::new(["admin"]),
        }
    }

    fn code(keys: &Keys, path: &str, key: Option<&str>) -> tonic::Code {
        match keys.check(path, key.map(str::as_bytes)) {
            Ok(()) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    }

    #[test]
    fn each_scope_takes_its_own_keys_and_every_key_of_a_set() {
        use tonic::Code::*;
        let keys = keys();
        assert_eq!(code(&keys, STOCK_QUERY, None), Unauthenticated);
        assert_eq!(code(&keys, STOCK_QUERY, Some("")), Unauthenticated);
        assert_eq!(code(&keys, STOCK_QUERY, Some("new-business")), Ok);
        assert_eq!(code(&keys, STOCK_QUERY, Some("old-business")), Ok);
        assert_eq!(
            code(&keys, STOCK_QUERY, Some("new-businesS")),
            Unauthenticated
        );
        assert_eq!(code(&keys, STOCK_QUERY, Some("admin")), PermissionDenied);
        assert_eq!(code(&keys, RESTOCK, Some("admin")), Ok);
        assert_eq!(code(&keys, RESTOCK, Some("new-business")), PermissionDenied);
        assert_eq!(code(&keys, RESTOCK, Some("nope")), Unauthenticated);
    }

    #[test]
    fn without_admin_keys_admin_rpcs_are_off_and_say_how_to_turn_them_on() {
        let keys = Keys {
            business: KeySet::new(["b"]),
            admin: KeySet::default(),
        };
        let refused = keys.check(RESTOCK, Some(b"b")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("ADMIN_API_KEY"), "{refused:?}");
    }

    #[test]
    fn admin_methods_are_methods_of_the_contract() {
        for method in ADMIN_METHODS {
            assert!(crate::methods::is_known(method), "{method}");
        }
    }
}
