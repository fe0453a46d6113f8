//! The test harness: fresh stores, services started in-process on port 0, and
//! clients that carry the API key.
//!
//! PostgreSQL tests read the server URL from `TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and fail when it is
//! unreachable: they never skip.

pub mod binaries;
pub mod broker;
pub mod collector;
pub mod h2_proxy;
pub mod http;
pub mod pki;
pub mod process;
pub mod services;
pub mod stores;
pub mod system;

pub use services::{ADMIN_KEY, API_KEY, Running, admin, authed};
pub use stores::{Backend, TestDb};

/// Polls `check` until it returns `Some`, for at most `timeout`; panics after.
pub async fn eventually<T, F, Fut>(what: &str, timeout: std::time::Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
