//! A durable saga engine, generic over its steps. It knows nothing about orders.
//!
//! - [`definition`]: what a saga is: an ordered list of [`Step`]s, each with a
//!   forward action and a compensation, and an optional pivot.
//! - [`retry`]: which errors are transient, and the backoff between attempts.
//! - [`log`]: the durable log (saga state plus step records) and its group-commit writer.
//! - [`metrics`]: sagas started, finished, in flight; step latency and retries.
//! - [`engine`]: drives sagas: runs steps, records each result before moving on,
//!   compensates in reverse on a definite failure, resumes open sagas after a crash.

pub mod definition;
pub mod engine;
pub mod log;
pub mod metrics;
pub mod retry;

pub use definition::{Announcement, Call, Milestone, Phase, SagaDefinition, Step};
pub use engine::{Engine, SagaChange};
pub use log::{CancelOutcome, SagaStatus, SagaView, StepStatus, StepView};
pub use retry::RetryPolicy;
