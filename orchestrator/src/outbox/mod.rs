//! The transactional outbox: events are rows written in the same transaction
//! as the state change that causes them, so there is never one without the
//! other. The [`relay`] publishes them to RabbitMQ afterwards.
//!
//! The message format is documented in `docs/events.md`.

pub mod relay;

use serde_json::{Map, Value};
use sqlx::AnyConnection;
use svc_kit::time::now_ms;
use uuid::Uuid;

/// An event to record with a state change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// What the events are about (an order); events of one aggregate are
    /// numbered 1, 2, 3… and published in that order.
    pub aggregate_id: Uuid,
    /// Also the routing key, e.g. `order.completed`.
    pub event_type: String,
    /// The event's own fields (a JSON object); the envelope fields are added.
    pub data: Map<String, Value>,
    /// W3C trace context of the change, so consumers can join the trace.
    pub traceparent: String,
}

/// Writes `event` inside the caller's transaction.
pub async fn insert(conn: &mut AnyConnection, event: &NewEvent) -> Result<(), sqlx::Error> {
    let aggregate_id = event.aggregate_id.to_string();
    let sequence: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(MAX(sequence), 0) + 1 AS BIGINT) FROM outbox WHERE aggregate_id = $1",
    )
    .bind(&aggregate_id)
    .fetch_one(&mut *conn)
    .await?;
    let event_id = Uuid::new_v4().to_string();
    let occurred_at_ms = now_ms();
    let mut body = Map::new();
    body.insert("event_id".into(), event_id.clone().into());
    body.insert("event_type".into(), event.event_type.clone().into());
    body.insert("sequence".into(), sequence.into());
    body.insert("occurred_at_ms".into(), occurred_at_ms.into());
    body.insert("traceparent".into(), event.traceparent.clone().into());
    for (key, value) in &event.data {
        body.insert(key.clone(), value.clone());
    }
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&event_id)
    .bind(&aggregate_id)
    .bind(sequence)
    .bind(&event.event_type)
    .bind(Value::Object(body).to_string())
    .bind(&event.traceparent)
    .bind(occurred_at_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
