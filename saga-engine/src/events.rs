//! The transactional outbox: events are rows written in the same transaction
//! as the state change that causes them, so there is never one without the
//! other. A relay publishes them afterwards.
//!
//! Two rules make every event deduplicable downstream:
//! - Its ID is derived from the saga and the milestone it announces, and a
//!   second write of the same event is a no-op. A checkpoint applied twice
//!   (its COMMIT's reply was lost, so it was sent again) mints nothing new.
//! - Its `sequence` comes from a counter on the saga's own row, not from the
//!   outbox rows that remain, so pruning sent events never restarts it.

use serde_json::{Map, Value};
use sqlx::AnyConnection;
use uuid::Uuid;

use crate::now_ms;

/// An event to record with a state change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The saga the event is about; its events are numbered 1, 2, 3…
    pub aggregate_id: Uuid,
    /// Unique within the saga (see [`crate::Milestone::key`]).
    pub key: String,
    /// Also the routing key, e.g. `order.completed`.
    pub event_type: String,
    /// The event's own fields (a JSON object); the envelope fields are added.
    pub data: Map<String, Value>,
    /// W3C trace context of the change, so consumers can join the trace.
    pub traceparent: String,
}

impl NewEvent {
    /// The event's ID: the same for every write of the same milestone.
    pub fn event_id(&self) -> Uuid {
        Uuid::new_v5(&self.aggregate_id, self.key.as_bytes())
    }
}

/// Takes the saga's next sequence number, unless the event was written
/// before (then nothing changes and no row comes back). One statement, which
/// also returns the epoch the saga is held at, for the event to carry.
pub(crate) const NEXT_SEQUENCE: &str = "UPDATE sagas SET events_sequence = events_sequence + 1 \
     WHERE saga_id = $1 AND NOT EXISTS (SELECT 1 FROM outbox WHERE event_id = $2) \
     RETURNING events_sequence, epoch";

pub(crate) const WRITTEN_BEFORE: &str = "SELECT id FROM outbox WHERE event_id = $1";

/// The event carries the epoch of its writer, as [`NEXT_SEQUENCE`] read it.
pub(crate) const INSERT: &str = "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// The published body: the envelope fields, then the event's own.
pub(crate) fn payload(
    event: &NewEvent,
    event_id: &str,
    sequence: i64,
    occurred_at_ms: i64,
) -> String {
    let mut body = Map::new();
    body.insert("event_id".into(), event_id.into());
    body.insert("event_type".into(), event.event_type.clone().into());
    body.insert("sequence".into(), sequence.into());
    body.insert("occurred_at_ms".into(), occurred_at_ms.into());
    body.insert("traceparent".into(), event.traceparent.clone().into());
    for (key, value) in &event.data {
        body.insert(key.clone(), value.clone());
    }
    Value::Object(body).to_string()
}

/// Writes `event` inside the caller's transaction, unless it was written
/// before. Returns whether it was new. The saga's row must exist.
pub async fn insert(conn: &mut AnyConnection, event: &NewEvent) -> Result<bool, sqlx::Error> {
    let event_id = event.event_id().to_string();
    let aggregate_id = event.aggregate_id.to_string();
    let taken: Option<(i64, i64)> = sqlx::query_as(NEXT_SEQUENCE)
        .bind(&aggregate_id)
        .bind(&event_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((sequence, epoch)) = taken else {
        // Written before, or (a bug) no such saga: only the first is fine.
        let written: Option<i64> = sqlx::query_scalar(WRITTEN_BEFORE)
            .bind(&event_id)
            .fetch_optional(&mut *conn)
            .await?;
        return match written {
            Some(_) => Ok(false),
            None => Err(sqlx::Error::RowNotFound),
        };
    };
    let occurred_at_ms = now_ms();
    sqlx::query(INSERT)
        .bind(&event_id)
        .bind(&aggregate_id)
        .bind(sequence)
        .bind(&event.event_type)
        .bind(payload(event, &event_id, sequence, occurred_at_ms))
        .bind(&event.traceparent)
        .bind(occurred_at_ms)
        .bind(epoch)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}
