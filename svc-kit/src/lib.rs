//! What every gRPC service of the order saga system shares.
//!
//! A domain service is a thin layer of business rules on top of this kit:
//!
//! - [`settings`]: the flags and env every service takes (address, store, API key, faults).
//! - [`store`]: one SQLite-or-PostgreSQL pool with migrations run at start-up.
//! - [`durability`]: what a commit waits for (the disk, by default).
//! - [`batch_writer`]: on a SQLite file, the hot writes in batches on one thread.
//! - [`batch`]: batch RPCs, each item run and answered as its own call.
//! - [`combined`]: on PostgreSQL, many requests' effects in one statement.
//! - [`idempotency`]: runs a mutating request once per `request_id`, replaying its stored reply.
//! - [`validate`]: field checks that answer INVALID_ARGUMENT naming the field.
//! - [`auth`]: the `x-api-key` check on business RPCs.
//! - [`fault`]: opt-in fault injection (failures, dropped replies, latency).
//! - [`server`]: serving a service with health, reflection and graceful drain.
//! - [`metrics`]: Prometheus metrics at `/metrics` on each service's own port.
//! - [`telemetry`]: logs and OpenTelemetry traces; [`propagation`]: W3C trace context across calls.

pub mod auth;
pub mod batch;
pub mod batch_writer;
pub mod combined;
pub mod durability;
pub mod error;
pub mod fault;
pub mod grpc_timeout;
pub mod idempotency;
pub mod methods;
pub mod metrics;
pub mod propagation;
pub mod server;
pub mod settings;
pub mod shared_transaction;
pub mod shed;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod undo;
pub mod validate;

pub use error::Error;
