//! Order events: the engine writes them to the outbox table in the same
//! transaction as the state change that causes them (see `saga_engine::events`),
//! and the [`relay`] publishes them to RabbitMQ afterwards; with several
//! replicas, only the one the [`leader`] election picked.
//!
//! The message format is documented in `docs/events.md`.

pub mod leader;
pub mod relay;
