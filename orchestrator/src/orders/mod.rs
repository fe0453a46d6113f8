//! The public `orders.v1.OrderService`, on top of the order saga.
//!
//! - [`api`]: the gRPC handlers.
//! - [`validate`]: checks of `CreateOrderRequest` and friends.
//! - [`pricing`]: prices the items from the stock service before the order is recorded.
//! - [`store`]: the orders table: the client's idempotency key, lookups, listing.
//! - [`view`]: the saga log rendered as an `Order` message.
//! - [`watch_limits`]: bounds on WatchOrder streams.
//! - [`watch_views`]: one reload per change of an order, shared by its streams.

pub mod api;
pub mod pricing;
pub mod store;
pub mod validate;
pub mod view;
pub mod watch_limits;
pub mod watch_views;

pub use api::OrderApi;
