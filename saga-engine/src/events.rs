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

use serde::Serialize;
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
     WHERE saga_id = $1 AND NOT EXISTS (SELECT 1 FROM outbox WHERE aggregate_id = $1 AND event_id = $2) \
     RETURNING events_sequence, epoch";

pub(crate) const WRITTEN_BEFORE: &str =
    "SELECT id FROM outbox WHERE aggregate_id = $1 AND event_id = $2";

/// The event carries the epoch of its writer, as [`NEXT_SEQUENCE`] read it.
pub(crate) const INSERT: &str = "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// [`NEXT_SEQUENCE`] and [`INSERT`] as one statement, for PostgreSQL (SQLite
/// has no data-modifying `WITH`): one round trip instead of two. The payload
/// is spliced around the sequence the update took.
const INSERT_TAKING_SEQUENCE: &str = "WITH taken AS ( \
       UPDATE sagas SET events_sequence = events_sequence + 1 \
       WHERE saga_id = $1 AND NOT EXISTS (SELECT 1 FROM outbox WHERE aggregate_id = $1 AND event_id = $2) \
       RETURNING events_sequence, epoch) \
     INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
     SELECT $2, $1, events_sequence, $3, $4 || events_sequence::text || $5, $6, $7, epoch FROM taken";

/// The head of the statements that number events in the store, for
/// PostgreSQL: `e`, the events (rows of [`numbered_later`], in the JSON
/// parameter given); `fresh`, those not written before, each with its place
/// `n` among its saga's; `counts`, how many each saga has. Rows are found
/// through their keys' indexes (`= ANY` of an array; see `log::postgres` for
/// why; the log writer's connections plan by key, see
/// `writer::planning_by_key`). An event is unique under its saga: each
/// event of the batch is one probe of that index on both its columns (a
/// subquery per event, which `LIMIT` keeps from being flattened into a join
/// the planner could serve with a scan of the whole index), and the table
/// is read only for an event found. Two `= ANY` conditions on the index's
/// two columns would probe every pair of their arrays' elements; probing
/// by saga alone read every earlier event of the batch's sagas, each from
/// the table while its page is not yet all-visible. A macro, so that the
/// statements stay `concat!`-ed literals.
macro_rules! fresh_events_ctes {
    ($events:literal) => {
        concat!(
            "e AS ( \
               SELECT * FROM jsonb_to_recordset(",
            $events,
            "::jsonb) AS e(ord bigint, event_id text, aggregate_id text, \
                 event_type text, head text, tail text, traceparent text, at_ms bigint)), \
             written AS ( \
               SELECT w.aggregate_id, w.event_id FROM e CROSS JOIN LATERAL ( \
                 SELECT o.aggregate_id, o.event_id FROM outbox o \
                 WHERE o.aggregate_id = e.aggregate_id AND o.event_id = e.event_id LIMIT 1) w), \
             fresh AS ( \
               SELECT e.*, row_number() OVER (PARTITION BY e.aggregate_id ORDER BY e.ord) AS n FROM e \
               WHERE NOT EXISTS (SELECT 1 FROM written w \
                 WHERE w.aggregate_id = e.aggregate_id AND w.event_id = e.event_id)), \
             counts AS (SELECT aggregate_id, MAX(n) AS n FROM fresh GROUP BY aggregate_id)"
        )
    };
}
pub(crate) use fresh_events_ctes;

/// Many events, of any sagas, in one statement, for PostgreSQL: the same
/// rules as [`INSERT_TAKING_SEQUENCE`], event by event in the order given.
/// Each saga's counter is bumped once by the number of its new events, and
/// they take the numbers in between. Returns how many events were new and
/// how many were inserted: fewer inserted means a saga was missing.
const INSERT_ALL_TAKING_SEQUENCES: &str = concat!(
    "WITH ",
    fresh_events_ctes!("$1"),
    ", \
     taken AS ( \
       UPDATE sagas s SET events_sequence = s.events_sequence + counts.n FROM counts \
       WHERE s.saga_id = counts.aggregate_id AND s.saga_id = ANY(ARRAY(SELECT aggregate_id FROM counts)) \
       RETURNING s.saga_id, s.events_sequence - counts.n AS base, s.epoch), \
     inserted AS ( \
       INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
       SELECT f.event_id, f.aggregate_id, t.base + f.n, f.event_type, f.head || (t.base + f.n)::text || f.tail, \
              f.traceparent, f.at_ms, t.epoch \
       FROM fresh f JOIN taken t ON t.saga_id = f.aggregate_id \
       ORDER BY f.ord \
       RETURNING 1) \
     SELECT (SELECT COUNT(*) FROM fresh) AS fresh, (SELECT COUNT(*) FROM inserted) AS inserted"
);

/// Writes `events` (any sagas; each saga's in the order given) inside the
/// caller's transaction on PostgreSQL, in one statement, skipping those
/// written before. Every event's saga row must exist.
pub(crate) async fn insert_all_postgres(
    conn: &mut AnyConnection,
    events: &[&NewEvent],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let occurred_at_ms = now_ms();
    let rows: Vec<NumberedLater<'_>> = events
        .iter()
        .enumerate()
        .map(|(ord, event)| numbered_later(ord, event, occurred_at_ms))
        .collect();
    let (fresh, inserted): (i64, i64) = sqlx::query_as(INSERT_ALL_TAKING_SEQUENCES)
        .bind(serde_json::to_string(&rows).expect("events serialize"))
        .fetch_one(&mut *conn)
        .await?;
    match fresh == inserted {
        true => Ok(()),
        false => Err(sqlx::Error::RowNotFound),
    }
}

/// `event` as a row of a statement that numbers it (its body short of the
/// sequence, which the store assigns), `ord` placing it among its saga's
/// other events in the same statement. Serialized straight to the
/// statement's JSON parameter (no `Value` made on the way).
pub(crate) fn numbered_later(
    ord: usize,
    event: &NewEvent,
    occurred_at_ms: i64,
) -> NumberedLater<'_> {
    let event_id = event.event_id().to_string();
    let payload = Payload::new(event, &event_id, occurred_at_ms);
    NumberedLater {
        ord,
        event_id,
        aggregate_id: event.aggregate_id,
        event_type: &event.event_type,
        head: payload.head,
        tail: payload.tail,
        traceparent: &event.traceparent,
        at_ms: occurred_at_ms,
    }
}

/// A row of [`numbered_later`]; its fields are the columns the statements
/// read (`fresh_events_ctes`).
#[derive(Serialize)]
pub(crate) struct NumberedLater<'a> {
    ord: usize,
    event_id: String,
    aggregate_id: Uuid,
    event_type: &'a str,
    head: String,
    tail: String,
    traceparent: &'a str,
    at_ms: i64,
}

/// One of a new saga's first events, as the statement that records the
/// saga takes it (see [`numbered_rows`]).
#[derive(Serialize)]
pub(crate) struct NumberedEvent<'a> {
    event_id: String,
    sequence: i64,
    event_type: &'a str,
    payload: String,
    traceparent: &'a str,
    at_ms: i64,
}

/// A new saga's first `events` as the rows of the statement that records
/// it: numbered 1, 2, 3… in order, their bodies whole.
pub(crate) fn numbered_rows(events: &[NewEvent], occurred_at_ms: i64) -> Vec<NumberedEvent<'_>> {
    events
        .iter()
        .zip(1_i64..)
        .map(|(event, sequence)| {
            let event_id = event.event_id().to_string();
            let payload = Payload::new(event, &event_id, occurred_at_ms).with_sequence(sequence);
            NumberedEvent {
                event_id,
                sequence,
                event_type: &event.event_type,
                payload,
                traceparent: &event.traceparent,
                at_ms: occurred_at_ms,
            }
        })
        .collect()
}

/// The published body short of its sequence number, which the store
/// assigns: the envelope fields and the event's own as one JSON object, its
/// keys in order. The envelope's fields win over the event's of the same
/// name.
pub(crate) struct Payload {
    /// Up to and including `"sequence":`.
    head: String,
    /// After the sequence's value, to the closing brace.
    tail: String,
}

/// A field's value in [`Payload`].
#[derive(Serialize)]
#[serde(untagged)]
enum FieldValue<'a> {
    Text(&'a str),
    Number(i64),
    Json(&'a Value),
}

/// The fields every event carries besides its own, in key order.
const ENVELOPE: [&str; 4] = ["event_id", "event_type", "occurred_at_ms", "traceparent"];

impl Payload {
    pub(crate) fn new(event: &NewEvent, event_id: &str, occurred_at_ms: i64) -> Self {
        // The event's own fields are in key order already (a `Map` without
        // `preserve_order` is sorted); the envelope's are merged in.
        let envelope = [
            FieldValue::Text(event_id),
            FieldValue::Text(&event.event_type),
            FieldValue::Number(occurred_at_ms),
            FieldValue::Text(&event.traceparent),
        ];
        let mut fields: Vec<(&str, FieldValue<'_>)> = event
            .data
            .iter()
            .filter(|(key, _)| key.as_str() != "sequence" && !ENVELOPE.contains(&key.as_str()))
            .map(|(key, value)| (key.as_str(), FieldValue::Json(value)))
            .chain(ENVELOPE.into_iter().zip(envelope))
            .collect();
        fields.sort_by(|a, b| a.0.cmp(b.0));
        let (mut head, mut tail) = (Vec::with_capacity(256), Vec::with_capacity(64));
        head.push(b'{');
        let field = |out: &mut Vec<u8>, key: &str, value: &FieldValue<'_>| {
            serde_json::to_writer(&mut *out, key).expect("a key serializes");
            out.push(b':');
            serde_json::to_writer(&mut *out, value).expect("a value serializes");
        };
        for (key, value) in &fields {
            if *key < "sequence" {
                field(&mut head, key, value);
                head.push(b',');
            } else {
                tail.push(b',');
                field(&mut tail, key, value);
            }
        }
        head.extend_from_slice(b"\"sequence\":");
        tail.push(b'}');
        let text = |bytes| String::from_utf8(bytes).expect("serde_json writes UTF-8");
        Payload {
            head: text(head),
            tail: text(tail),
        }
    }

    pub(crate) fn with_sequence(&self, sequence: i64) -> String {
        format!("{}{sequence}{}", self.head, self.tail)
    }
}

/// Writes `event` inside the caller's transaction, unless it was written
/// before. Returns whether it was new. The saga's row must exist.
pub async fn insert(conn: &mut AnyConnection, event: &NewEvent) -> Result<bool, sqlx::Error> {
    let event_id = event.event_id().to_string();
    let aggregate_id = event.aggregate_id.to_string();
    let occurred_at_ms = now_ms();
    let payload = Payload::new(event, &event_id, occurred_at_ms);
    if conn.backend_name() == "PostgreSQL" {
        let inserted = sqlx::query(INSERT_TAKING_SEQUENCE)
            .bind(&aggregate_id)
            .bind(&event_id)
            .bind(&event.event_type)
            .bind(&payload.head)
            .bind(&payload.tail)
            .bind(&event.traceparent)
            .bind(occurred_at_ms)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        return match inserted {
            1 => Ok(true),
            _ => written_before(conn, &aggregate_id, &event_id).await,
        };
    }
    let taken: Option<(i64, i64)> = sqlx::query_as(NEXT_SEQUENCE)
        .bind(&aggregate_id)
        .bind(&event_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some((sequence, epoch)) = taken else {
        return written_before(conn, &aggregate_id, &event_id).await;
    };
    sqlx::query(INSERT)
        .bind(&event_id)
        .bind(&aggregate_id)
        .bind(sequence)
        .bind(&event.event_type)
        .bind(payload.with_sequence(sequence))
        .bind(&event.traceparent)
        .bind(occurred_at_ms)
        .bind(epoch)
        .execute(&mut *conn)
        .await?;
    Ok(true)
}

/// No sequence was taken: the event was written before (nothing new), or
/// (a bug) its saga does not exist.
async fn written_before(
    conn: &mut AnyConnection,
    aggregate_id: &str,
    event_id: &str,
) -> Result<bool, sqlx::Error> {
    let written: Option<i64> = sqlx::query_scalar(WRITTEN_BEFORE)
        .bind(aggregate_id)
        .bind(event_id)
        .fetch_optional(&mut *conn)
        .await?;
    match written {
        Some(_) => Ok(false),
        None => Err(sqlx::Error::RowNotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: Value) -> NewEvent {
        NewEvent {
            aggregate_id: Uuid::nil(),
            key: "completed".into(),
            event_type: "order.completed".into(),
            data: data.as_object().unwrap().clone(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        }
    }

    #[test]
    fn the_payload_is_one_json_object_with_the_sequence_the_store_took() {
        let data = serde_json::json!({"order_id": "o-1", "total_cents": 1250, "zeta": [1, "two"], "a": {"b": null}});
        let payload = Payload::new(&event(data), "e-1", 1_700_000_000_000).with_sequence(42);
        let body: Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "a": {"b": null}, "event_id": "e-1", "event_type": "order.completed",
                "occurred_at_ms": 1_700_000_000_000_i64, "order_id": "o-1", "sequence": 42,
                "total_cents": 1250, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "zeta": [1, "two"],
            })
        );
        // The text serde_json writes for the same object: no blanks, keys in order.
        assert_eq!(payload, body.to_string());
    }

    #[test]
    fn the_envelope_wins_over_the_events_own_fields_of_the_same_name() {
        let note = r#"a "quoted" ,"sequence":1"#;
        let data = serde_json::json!({"sequence": "mine", "event_id": "mine", "note": note});
        let payload = Payload::new(&event(data), "e-2", 5).with_sequence(7);
        let body: Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(body["sequence"], 7);
        assert_eq!(body["event_id"], "e-2");
        assert_eq!(body["note"], note);
    }
}
