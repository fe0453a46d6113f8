//! A durable saga engine, generic over its steps. It knows nothing of orders.
//!
//! A saga is a [`SagaDefinition`]: an ordered list of [`Step`]s, each a forward
//! action and its compensation, and optionally a pivot step after whose start
//! the saga can no longer be cancelled. The [`Engine`] drives each saga one
//! step at a time and writes each step's result to the log before it moves on.
//!
//! - [`definition`]: what a saga is, to the engine.
//! - [`retry`]: which answers are definite and which leave the outcome unknown;
//!   the backoff between attempts.
//! - [`cursor`]: where a saga stands, as a type.
//! - [`log`]: the durable log (saga state, step records) and its group-commit writer.
//! - [`events`]: the transactional outbox: events that commit with the change
//!   that causes them, identified by the saga and its milestone.
//! - [`changes`]: who hears of a committed change: the waiters of that saga.
//! - [`engine`]: the handle: start, resume, cancel, watch, shut down.
//! - [`driver`]: what drives one saga: steps, checkpoints, compensations.
//! - [`replicas`]: several engines on one PostgreSQL database: leases,
//!   epochs, takeover and hand-over.
//! - [`notifications`]: changes told across replicas (LISTEN/NOTIFY).
//! - [`metrics`]: sagas started, finished and in flight; step latency and retries.
//! - [`crash_points`]: named places where tests abort or pause the process.
//!
//! The tables live in [`MIGRATIONS_SQLITE`] and [`MIGRATIONS_POSTGRES`].

pub mod changes;
pub mod crash_points;
pub mod cursor;
pub mod definition;
mod driver;
pub mod engine;
pub mod events;
mod holds;
pub mod log;
pub mod metrics;
mod notifications;
pub mod replicas;
pub mod retry;
mod trace_context;

pub use changes::{SagaChange, SagaWatch};
pub use cursor::Cursor;
pub use definition::{Announcement, Call, Milestone, Phase, SagaDefinition, Step};
pub use engine::{Admission, Engine, Ownership, Started};
pub use log::{
    Admit, CancelOutcome, Reopen, ReopenOutcome, SagaStatus, SagaView, StepStatus, StepView,
};
pub use replicas::ReplicaSettings;
pub use retry::RetryPolicy;

/// The engine's tables on SQLite, for users that do not create them themselves.
pub static MIGRATIONS_SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
/// The engine's tables on PostgreSQL.
pub static MIGRATIONS_POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// Wall-clock time as stored: Unix epoch milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
