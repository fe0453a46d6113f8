//! What a person looking at a saga wants beside its state: the events it
//! emitted, the operators' actions on it, each attempt of its retried steps,
//! and how many sagas rest in each status. Reads for the explorer, off the hot path, so plain pool queries.

use sqlx::{AnyPool, Row};
use uuid::Uuid;

use super::SagaStatus;
use crate::definition::Phase;

/// An event the saga wrote to its outbox (sent events may be pruned later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub sequence: i64,
    pub event_type: String,
    pub created_at_ms: i64,
    /// When the broker confirmed it; `None` while it waits in the outbox.
    pub sent_at_ms: Option<i64>,
}

/// An operator's action, kept with its own request ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRecord {
    pub request_id: String,
    pub action: String,
    pub note: String,
    pub at_ms: i64,
}

/// One attempt of a step that took more than one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptView {
    pub phase: Phase,
    pub step_index: i64,
    pub attempt: i64,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// Empty for the attempt that settled the step.
    pub error: String,
}

/// A saga's events, operator actions and the attempts of its retried
/// steps, each oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SagaHistory {
    pub events: Vec<EventRecord>,
    pub actions: Vec<ActionRecord>,
    pub attempts: Vec<AttemptView>,
}

const EVENTS: &str = "SELECT sequence, event_type, created_at_ms, sent_at_ms FROM outbox \
     WHERE aggregate_id = $1 ORDER BY sequence";
const ACTIONS: &str = "SELECT request_id, action, note, at_ms FROM saga_actions \
     WHERE saga_id = $1 ORDER BY at_ms, request_id";
const ATTEMPTS: &str = "SELECT phase, step_index, attempt, started_at_ms, finished_at_ms, error \
     FROM saga_attempts WHERE saga_id = $1 ORDER BY started_at_ms, phase, step_index, attempt";
const COUNTS: &str = "SELECT status, COUNT(*) AS n FROM sagas GROUP BY status";

pub async fn load_history(pool: &AnyPool, saga_id: Uuid) -> Result<SagaHistory, sqlx::Error> {
    let id = saga_id.to_string();
    let events = sqlx::query(EVENTS)
        .bind(&id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            Ok(EventRecord {
                sequence: r.try_get("sequence")?,
                event_type: r.try_get("event_type")?,
                created_at_ms: r.try_get("created_at_ms")?,
                sent_at_ms: r.try_get("sent_at_ms")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    let actions = sqlx::query(ACTIONS)
        .bind(&id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            Ok(ActionRecord {
                request_id: r.try_get("request_id")?,
                action: r.try_get("action")?,
                note: r.try_get("note")?,
                at_ms: r.try_get("at_ms")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    let attempts = sqlx::query(ATTEMPTS)
        .bind(&id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(|r| {
            let phase: String = r.try_get("phase")?;
            Ok(AttemptView {
                phase: Phase::parse(&phase)
                    .ok_or_else(|| sqlx::Error::Protocol(format!("unknown phase {phase:?}")))?,
                step_index: r.try_get("step_index")?,
                attempt: r.try_get("attempt")?,
                started_at_ms: r.try_get("started_at_ms")?,
                finished_at_ms: r.try_get("finished_at_ms")?,
                error: r.try_get("error")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(SagaHistory {
        events,
        actions,
        attempts,
    })
}

/// How many sagas are in each status, every status listed (zero included).
pub async fn count_by_status(pool: &AnyPool) -> Result<Vec<(SagaStatus, i64)>, sqlx::Error> {
    let mut counts: Vec<(SagaStatus, i64)> = SagaStatus::ALL.iter().map(|&s| (s, 0)).collect();
    for row in sqlx::query(COUNTS).fetch_all(pool).await? {
        let status: String = row.try_get("status")?;
        let n: i64 = row.try_get("n")?;
        let status = SagaStatus::parse(&status)
            .ok_or_else(|| sqlx::Error::Protocol(format!("unknown saga status {status:?}")))?;
        if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
            slot.1 = n;
        }
    }
    Ok(counts)
}
