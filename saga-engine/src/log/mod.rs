//! The durable log: each saga's state and its step records, in the store.
//!
//! Every change a driver makes is a [`Checkpoint`]: step records plus the saga's
//! new state, applied in one transaction. Checkpoints go through the
//! [`LogWriter`], which commits whatever checkpoints are waiting as one
//! transaction (group commit): under load, many sagas share one commit and one
//! fsync. A driver moves on only after its checkpoint's commit.

use std::{
    collections::{HashMap, HashSet},
    sync::{LazyLock, Mutex},
    time::Duration,
};

use sqlx::{AnyConnection, AnyPool, Row};
use uuid::Uuid;

use crate::{
    definition::Phase,
    engine::Admission,
    events::{self, NewEvent},
    now_ms,
};

mod crash_recovery;
mod durability;
pub mod history;
pub(crate) mod kept;
mod postgres;
mod sqlite;
mod writer;

pub use durability::Durability;
pub(crate) use sqlite::SqliteLog;
pub use sqlite::{SqliteReader, load_view as load_sqlite_view};

/// The file behind a SQLite pool; `None` for PostgreSQL and for an in-memory
/// database.
pub fn sqlite_file(pool: &AnyPool) -> Option<std::path::PathBuf> {
    SqliteLog::file_of(pool)
}
pub(crate) use writer::Start;
pub(crate) use writer::once_set;
pub use writer::{Admit, LogWriter};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaStatus {
    Running,
    Compensating,
    Completed,
    Compensated,
    Cancelled,
    Failed,
    /// A compensation kept failing past its budget: the saga rests until a
    /// person acts. Not driven, not resumed; its failed step keeps the cause.
    NeedsAttention,
}

impl SagaStatus {
    pub const ALL: [SagaStatus; 7] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Cancelled,
        SagaStatus::Failed,
        SagaStatus::NeedsAttention,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "RUNNING",
            SagaStatus::Compensating => "COMPENSATING",
            SagaStatus::Completed => "COMPLETED",
            SagaStatus::Compensated => "COMPENSATED",
            SagaStatus::Cancelled => "CANCELLED",
            SagaStatus::Failed => "FAILED",
            SagaStatus::NeedsAttention => "NEEDS_ATTENTION",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Running,
    Succeeded,
    Failed,
    /// The retry budget was spent with no definite answer.
    Unknown,
    /// Never run: the saga was cancelled before the step began.
    Skipped,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Running => "RUNNING",
            StepStatus::Succeeded => "SUCCEEDED",
            StepStatus::Failed => "FAILED",
            StepStatus::Unknown => "UNKNOWN",
            StepStatus::Skipped => "SKIPPED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        [
            StepStatus::Running,
            StepStatus::Succeeded,
            StepStatus::Failed,
            StepStatus::Unknown,
            StepStatus::Skipped,
        ]
        .into_iter()
        .find(|s| s.as_str() == value)
    }
}

/// What a new saga is recorded with.
#[derive(Debug, Clone)]
pub struct NewSaga {
    pub saga_id: Uuid,
    pub kind: &'static str,
    pub data_json: String,
    pub trace_context: String,
    /// Step 0 is the pivot: the saga can't be cancelled once started.
    pub starts_at_pivot: bool,
    /// The replica that records it drives it, at epoch 1.
    pub owner: String,
    /// When it is recorded: its created and updated times. Chosen by the
    /// engine, which knows its saga as written (see [`SagaView::recorded`]).
    pub at_ms: i64,
}

/// The epoch a new saga starts with, under the replica that records it.
pub const FIRST_EPOCH: i64 = 1;

pub(crate) const INSERT_SAGA: &str = "INSERT INTO sagas (saga_id, kind, data, status, next_step, trace_context, created_at_ms, updated_at_ms, pivot_passed, owner, epoch) \
     VALUES ($1, $2, $3, 'RUNNING', 0, $4, $5, $5, $6, $7, 1)";

/// The notice to the other replicas, as a common table expression `told`:
/// one line per saga that `changed` (a query of `saga_id, told_status`)
/// names, in payloads of at most 120 lines (about 6,000 bytes, under
/// PostgreSQL's 8,000; see [`crate::notifications::encode`]), on the
/// channel `$channel`, signed by `$sender` (no notice when it is NULL).
/// The notices go out only if the statement commits.
macro_rules! told_cte {
    ($channel:literal, $sender:literal, $changed:literal) => {
        concat!(
            "told AS ( \
               SELECT pg_notify(",
            $channel,
            ", ",
            $sender,
            " || string_agg(chr(10) || p.saga_id || ' ' || p.told_status, '' ORDER BY p.i)) \
               FROM (SELECT saga_id, told_status, row_number() OVER () - 1 AS i FROM (",
            $changed,
            ") AS changed) p \
               WHERE ",
            $sender,
            " IS NOT NULL GROUP BY p.i / 120)"
        )
    };
}
pub(crate) use told_cte;

/// The statement `build` makes for `key`, built once per process (the
/// statements that take a caller's SQL): leaked, as the statements a
/// connection prepares are kept by their text.
pub(crate) fn built_once(
    key: &'static str,
    build: impl FnOnce(&str) -> String,
    cache: &'static LazyLock<Mutex<HashMap<&'static str, &'static str>>>,
) -> &'static str {
    let mut built = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    built
        .entry(key)
        .or_insert_with(|| Box::leak(build(key).into_boxed_str()))
}

/// Most new sagas admitted by one statement: its JSON parameters grow with
/// each, and its plan does not.
pub(crate) const MOST_ADMITTED_AT_ONCE: usize = 128;

/// New sagas, each recorded as [`insert_saga`] records one, with their
/// caller's rows and their first events, in one statement: a saga (and its
/// events) is written only if the caller's insert (`rows_sql`, see
/// [`crate::Admit::insert_rows_sql`]) wrote its row. Built once per caller's
/// statement.
///
/// Its parameters: `$1` the caller's rows, `$2` the sagas (see
/// [`AdmittedSagaRow`]), each with its first events (numbered 1, 2, 3…
/// already: nothing of a new saga was written before, so the statement
/// looks nothing up), then `$3` the channel and `$4` the sender of the
/// notice to the other replicas, or `NULL` for none (in a batch, one notice
/// goes for the whole batch at its end; see [`told_cte!`]). It returns the
/// ID of each saga it wrote, and of each recorded before (see
/// [`admission_ctes`]).
///
/// The sagas travel as JSON arrays, so the statement has one text and one
/// plan for any number of them. Written as one copy of the saga's statement
/// per saga, each count was a statement of its own: up to 32 plans per
/// connection, each up to 480 parameters, and planning them cost as much
/// as running them in a 4,000-order run (docs/benchmarks.md).
fn sagas_admitted_sql(rows_sql: &'static str) -> &'static str {
    static BUILT: LazyLock<Mutex<HashMap<&'static str, &'static str>>> =
        LazyLock::new(Mutex::default);
    built_once(rows_sql, build_sagas_admitted_sql, &BUILT)
}

fn build_sagas_admitted_sql(rows_sql: &str) -> String {
    format!(
        concat!(
            "WITH {}, ",
            told_cte!(
                "$3",
                "$4",
                "SELECT saga_id, 'RUNNING' AS told_status FROM new_saga"
            ),
            " SELECT saga_id, (SELECT COUNT(*) FROM told) AS told FROM new_saga \
             UNION ALL SELECT saga_id, 0 FROM recorded"
        ),
        admission_ctes(rows_sql, "$1", "$2")
    )
}

/// The common table expressions that admit new sagas: `admitted`, the
/// caller's insert (its `$1` as `rows`); `new_sagas`, the sagas as
/// `sagas` gives them ([`AdmittedSagaRow`]s); `new_saga`, their rows, each
/// written only if the caller's insert wrote its own, returning the
/// `saga_id` of each; `new_events`, the first events of those; and
/// `recorded`, those of the sagas that were recorded before. Shared by
/// [`sagas_admitted_sql`] and the batch statement that also applies
/// checkpoints (see [`postgres`]).
///
/// A saga recorded before is answered admitted: it is this very start,
/// made again after its statement committed. A batch that commits as one
/// statement may fail after it did (its connection lost before the reply,
/// a read after it), and the writer then makes each of its writes again,
/// alone; its caller's row, there already, refuses it, and answered
/// "refused", the saga would be recorded with no one to drive it.
pub(crate) fn admission_ctes(rows_sql: &str, rows: &str, sagas: &str) -> String {
    let rows_sql = with_first_parameter(rows_sql, rows);
    format!(
        "admitted AS ({rows_sql}), \
         new_sagas AS ( \
           SELECT * FROM jsonb_to_recordset({sagas}::jsonb) AS j(i bigint, saga_id text, kind text, data text, \
             trace_context text, at_ms bigint, pivot_passed bigint, owner text, events jsonb)), \
         new_saga AS ( \
           INSERT INTO sagas (saga_id, kind, data, status, next_step, trace_context, created_at_ms, updated_at_ms, pivot_passed, owner, epoch, events_sequence) \
           SELECT j.saga_id, j.kind, j.data, 'RUNNING', 0, j.trace_context, j.at_ms, j.at_ms, j.pivot_passed, j.owner, 1, jsonb_array_length(j.events) \
           FROM new_sagas j WHERE j.saga_id IN (SELECT saga_id FROM admitted) ORDER BY j.i \
           RETURNING saga_id), \
         new_events AS ( \
           INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
           SELECT e.event_id, j.saga_id, e.sequence, e.event_type, e.payload, e.traceparent, e.at_ms, 1 \
           FROM new_sagas j CROSS JOIN LATERAL jsonb_to_recordset(j.events) AS e(event_id text, sequence bigint, event_type text, \
             payload text, traceparent text, at_ms bigint) \
           WHERE j.saga_id IN (SELECT saga_id FROM new_saga) \
           ORDER BY j.i, e.sequence), \
         recorded AS (SELECT saga_id FROM sagas WHERE saga_id IN (SELECT saga_id FROM new_sagas))"
    )
}

/// `sql` with its parameter `$1` (its only one, see
/// [`crate::Admit::insert_rows_sql`]) written as `parameter`.
fn with_first_parameter(sql: &str, parameter: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut rest = sql;
    while let Some(at) = rest.find("$1") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        match after.starts_with(|c: char| c.is_ascii_digit()) {
            true => out.push_str("$1"),
            false => out.push_str(parameter),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// One saga of [`sagas_admitted_sql`]'s `$2`: its row's fields, its place in
/// the batch (`i`: the events are written in the batch's order), and its
/// first events.
#[derive(serde::Serialize)]
struct AdmittedSagaRow<'a> {
    i: usize,
    saga_id: String,
    kind: &'static str,
    data: &'a str,
    trace_context: &'a str,
    at_ms: i64,
    pivot_passed: i64,
    owner: &'a str,
    events: Vec<events::NumberedEvent<'a>>,
}

#[cfg(test)]
mod sagas_admitted_sql_tests {
    #[test]
    fn the_callers_statement_comes_first_and_is_its_only_use_of_its_parameter() {
        let sql = super::build_sagas_admitted_sql(
            "INSERT INTO t (a) SELECT a FROM jsonb_to_recordset($1::jsonb) AS r(a text) ON CONFLICT (a) DO NOTHING RETURNING a AS saga_id",
        );
        assert!(
            sql.starts_with(
                "WITH admitted AS (INSERT INTO t (a) SELECT a FROM jsonb_to_recordset($1::jsonb) AS r(a text) ON CONFLICT (a) DO NOTHING RETURNING a AS saga_id), "
            ),
            "{sql}"
        );
        assert_eq!(sql.matches("$1").count(), 1, "{sql}");
        assert!(!sql.contains("$5"), "{sql}");
        assert!(
            sql.ends_with(
                "SELECT saga_id, (SELECT COUNT(*) FROM told) AS told FROM new_saga \
                 UNION ALL SELECT saga_id, 0 FROM recorded"
            ),
            "{sql}"
        );
    }

    #[test]
    fn the_callers_parameter_is_renamed_and_no_other() {
        assert_eq!(
            super::with_first_parameter("VALUES ($1, $10, $1)", "$7"),
            "VALUES ($7, $10, $7)"
        );
    }
}

/// The seven parameters of [`INSERT_SAGA`], the saga's row, at its own
/// time: the first seven of every statement that admits a saga.
fn bind_new_saga<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    saga: &NewSaga,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    query
        .bind(saga.saga_id.to_string())
        .bind(saga.kind)
        .bind(&saga.data_json)
        .bind(&saga.trace_context)
        .bind(saga.at_ms)
        .bind(i64::from(saga.starts_at_pivot))
        .bind(&saga.owner)
}

/// A new saga to admit with [`insert_sagas_admitted`], with the first
/// events its statement writes (all of this saga's, each once).
pub(crate) struct ToAdmit<'a> {
    pub saga: &'a NewSaga,
    pub events: &'a [NewEvent],
    pub admit: &'a dyn crate::Admit,
}

/// New sagas that share the caller's statement `rows_sql`, each recorded
/// as [`insert_saga`] records one with its caller's rows and its `events`,
/// in one statement (PostgreSQL; see [`crate::Admit::insert_rows_sql`]):
/// each all, or nothing when the caller's insert wrote no row for it. One
/// round trip for a batch's new sagas. Two with one key (the same
/// `request_id`): the later one in `sagas` is refused, as if they came one
/// after the other. With `notify_as`, the statement also tells the other
/// replicas of the new sagas (for a statement that commits alone).
pub(crate) async fn insert_sagas_admitted(
    conn: &mut AnyConnection,
    rows_sql: &'static str,
    sagas: &[ToAdmit<'_>],
    notify_as: Option<Uuid>,
) -> Result<Vec<Admission>, sqlx::Error> {
    let mut admitting = Admitting::new(sagas);
    let written: HashSet<String> = sqlx::query(sagas_admitted_sql(rows_sql))
        .bind(std::mem::take(&mut admitting.rows))
        .bind(std::mem::take(&mut admitting.sagas))
        .bind(crate::notifications::CHANGES)
        .bind(notify_as.map(|sender| sender.to_string()))
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get("saga_id"))
        .collect::<Result<_, _>>()?;
    Ok(admitting.answers(&written))
}

/// New sagas as [`admission_ctes`] takes them: the callers' rows and the
/// sagas, each a JSON array, and the sagas' IDs in order.
pub(crate) struct Admitting {
    pub rows: String,
    pub sagas: String,
    ids: Vec<String>,
}

impl Admitting {
    pub(crate) fn new(sagas: &[ToAdmit<'_>]) -> Self {
        let at_ms = now_ms();
        let mut callers = String::from("[");
        let mut rows = Vec::with_capacity(sagas.len());
        for (i, one) in sagas.iter().enumerate() {
            if i > 0 {
                callers.push(',');
            }
            callers.push_str(&one.admit.insert_row(one.saga.at_ms));
            rows.push(AdmittedSagaRow {
                i,
                saga_id: one.saga.saga_id.to_string(),
                kind: one.saga.kind,
                data: &one.saga.data_json,
                trace_context: &one.saga.trace_context,
                at_ms: one.saga.at_ms,
                pivot_passed: i64::from(one.saga.starts_at_pivot),
                owner: &one.saga.owner,
                events: events::numbered_rows(one.events, at_ms),
            });
        }
        callers.push(']');
        Admitting {
            rows: callers,
            sagas: serde_json::to_string(&rows).expect("sagas serialize"),
            ids: rows.into_iter().map(|row| row.saga_id).collect(),
        }
    }

    /// Each saga's answer, in order, given the IDs of those written.
    pub(crate) fn answers(&self, written: &HashSet<String>) -> Vec<Admission> {
        self.ids
            .iter()
            .map(|id| match written.contains(id) {
                true => Admission::Admit,
                false => Admission::Refuse,
            })
            .collect()
    }
}

/// Records a new saga, RUNNING at step 0, inside the caller's transaction (so
/// that the caller's own rows, e.g. the order, commit with it).
pub async fn insert_saga(conn: &mut AnyConnection, saga: &NewSaga) -> Result<(), sqlx::Error> {
    bind_new_saga(sqlx::query(INSERT_SAGA), saga)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One step's record in the log.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub phase: Phase,
    pub index: i64,
    pub name: &'static str,
    pub status: StepStatus,
    pub attempts: u32,
    pub last_error: String,
    pub output: String,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Attempts to record in `saga_attempts` with this record (only for a
    /// step that took more than one; see [`AttemptRecord`]).
    pub attempt_log: Vec<AttemptRecord>,
}

/// One attempt of a step, for the saga's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// Why it did not settle the step; empty for the one that did.
    pub error: String,
}

/// A step keeps at most this many attempts in `saga_attempts`: a
/// compensation may retry for hours. Its record counts them all.
pub const MAX_RECORDED_ATTEMPTS: u32 = 100;

impl StepRecord {
    pub fn started(phase: Phase, index: i64, name: &'static str, at_ms: i64) -> Self {
        StepRecord {
            phase,
            index,
            name,
            status: StepStatus::Running,
            attempts: 0,
            last_error: String::new(),
            output: String::new(),
            started_at_ms: Some(at_ms),
            finished_at_ms: None,
            attempt_log: Vec::new(),
        }
    }
}

/// The saga's position after a checkpoint.
#[derive(Debug, Clone)]
pub struct SagaState {
    pub status: SagaStatus,
    pub next_step: i64,
    pub failure_reason: String,
}

/// One atomic change of one saga.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub saga_id: Uuid,
    /// The epoch its driver claimed the saga at: the change is written only
    /// if the saga is still at that epoch (no other replica took it since).
    pub epoch: i64,
    pub steps: Vec<StepRecord>,
    pub state: Option<SagaState>,
    /// Mark the pivot as begun, unless a cancellation came first.
    pub enter_pivot: bool,
    /// Make the saga COMPLETED, unless a cancellation came first; then it
    /// stays RUNNING with every step done, and `events` are not written.
    pub complete: bool,
    /// Outbox events that commit with this change.
    pub events: Vec<NewEvent>,
}

impl Checkpoint {
    /// A checkpoint that neither enters the pivot nor completes the saga.
    pub fn new(
        saga_id: Uuid,
        epoch: i64,
        steps: Vec<StepRecord>,
        state: Option<SagaState>,
        events: Vec<NewEvent>,
    ) -> Self {
        Checkpoint {
            saga_id,
            epoch,
            steps,
            state,
            enter_pivot: false,
            complete: false,
            events,
        }
    }
}

impl Checkpoint {
    /// The saga's new status, next step and failure reason, each `None` to
    /// keep the stored one.
    pub(crate) fn state_columns(&self) -> (Option<&'static str>, Option<i64>, Option<&str>) {
        match &self.state {
            Some(state) => (
                Some(state.status.as_str()),
                Some(state.next_step),
                Some(state.failure_reason.as_str()),
            ),
            None => (None, None, None),
        }
    }

    /// The status this checkpoint set, as `applied` says, if it set one.
    pub(crate) fn status_after(&self, applied: &Applied) -> Option<SagaStatus> {
        if self.complete {
            applied.completed.then_some(SagaStatus::Completed)
        } else {
            self.state.as_ref().map(|s| s.status)
        }
    }

    /// Whether the events go with this checkpoint: a refused completion
    /// announces nothing (the saga compensates instead).
    pub(crate) fn announces(&self, completed: bool) -> bool {
        !self.complete || completed
    }
}

/// What the store said while applying a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    /// A client asked to cancel the saga (read in the same transaction).
    pub cancel_requested: bool,
    /// `enter_pivot` was granted.
    pub pivot_entered: bool,
    /// `complete` was granted.
    pub completed: bool,
    /// The saga was already terminal (with this status), so nothing was written.
    pub closed: Option<SagaStatus>,
    /// The saga is open but at another epoch: another replica claimed it
    /// since this driver did, so nothing was written.
    pub fenced: bool,
    /// The saga's updated time as written (0 when nothing was).
    pub updated_at_ms: i64,
}

impl Applied {
    pub(crate) fn closed(status: SagaStatus) -> Self {
        Applied {
            cancel_requested: false,
            pivot_entered: false,
            completed: false,
            closed: Some(status),
            fenced: false,
            updated_at_ms: 0,
        }
    }

    /// Nothing was written: the saga is terminal (`closed`) or another
    /// replica holds it (`fenced`), as its row says now.
    pub(crate) fn refused(status: SagaStatus) -> Self {
        if status.is_terminal() {
            Applied::closed(status)
        } else {
            Applied {
                closed: None,
                fenced: true,
                ..Applied::closed(status)
            }
        }
    }
}

/// The record carries the epoch of its writer: the one the checkpoint's own
/// fenced update just matched (or the first, for a new saga), so no second
/// read of the saga's row.
pub(crate) const UPSERT_STEP: &str = "INSERT INTO saga_steps (saga_id, phase, step_index, name, status, attempts, last_error, output, started_at_ms, finished_at_ms, epoch) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
     ON CONFLICT (saga_id, phase, step_index) DO UPDATE SET \
       status = excluded.status, attempts = excluded.attempts, last_error = excluded.last_error, epoch = excluded.epoch, \
       output = excluded.output, finished_at_ms = excluded.finished_at_ms, \
       started_at_ms = COALESCE(saga_steps.started_at_ms, excluded.started_at_ms)";

/// One statement: the new state, the pivot and the completion (each granted
/// only if no cancel came first), and what the row says about cancellation.
/// A cancel is a conditional update of the same row, so exactly one wins.
/// Only an open saga moves: a terminal one is never written again. Only the
/// driver at the saga's current epoch moves it: the fence (a takeover bumps
/// the epoch under the row's lock, so the two are serialised).
pub(crate) const APPLY_STATE: &str = "UPDATE sagas SET \
     status = CASE WHEN $1 = 1 THEN (CASE WHEN cancel_requested = 0 THEN 'COMPLETED' ELSE 'RUNNING' END) \
              ELSE COALESCE($2, status) END, \
     next_step = COALESCE($3, next_step), \
     failure_reason = COALESCE($4, failure_reason), updated_at_ms = $5, \
     pivot_passed = CASE WHEN $6 = 1 AND cancel_requested = 0 THEN 1 ELSE pivot_passed END \
     WHERE saga_id = $7 AND status IN ('RUNNING', 'COMPENSATING') AND epoch = $8 \
     RETURNING status, cancel_requested, pivot_passed, saga_id, epoch, updated_at_ms";

pub(crate) const SAGA_STATUS: &str = "SELECT status FROM sagas WHERE saga_id = $1";

/// Written again (a retried checkpoint), it changes nothing.
pub(crate) const INSERT_ATTEMPT: &str = "INSERT INTO saga_attempts (saga_id, phase, step_index, attempt, started_at_ms, finished_at_ms, error) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (saga_id, phase, step_index, attempt) DO NOTHING";

/// The attempts a checkpoint's step records carry (rare: only retried steps).
async fn insert_attempts(
    conn: &mut AnyConnection,
    checkpoint: &Checkpoint,
) -> Result<(), sqlx::Error> {
    for step in &checkpoint.steps {
        for attempt in &step.attempt_log {
            sqlx::query(INSERT_ATTEMPT)
                .bind(checkpoint.saga_id.to_string())
                .bind(step.phase.as_str())
                .bind(step.index)
                .bind(i64::from(attempt.attempt))
                .bind(attempt.started_at_ms)
                .bind(attempt.finished_at_ms)
                .bind(&attempt.error)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

pub(crate) async fn upsert_step(
    conn: &mut AnyConnection,
    saga_id: Uuid,
    step: &StepRecord,
    epoch: i64,
) -> Result<(), sqlx::Error> {
    bind_step(sqlx::query(UPSERT_STEP).bind(saga_id.to_string()), step)
        .bind(epoch)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A step record's nine columns, from `phase` to `finished_at_ms`, in the
/// order of [`UPSERT_STEP`] (and of a lone checkpoint's statement).
pub(crate) fn bind_step<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    step: &'q StepRecord,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    query
        .bind(step.phase.as_str())
        .bind(step.index)
        .bind(step.name)
        .bind(step.status.as_str())
        .bind(i64::from(step.attempts))
        .bind(&step.last_error)
        .bind(&step.output)
        .bind(step.started_at_ms)
        .bind(step.finished_at_ms)
}

/// The eight parameters of [`APPLY_STATE`], which the one-statement form of
/// a lone checkpoint (`log::postgres`) takes first too: what the checkpoint
/// sets, then the saga and the epoch its write is fenced on.
pub(crate) fn bind_state<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    checkpoint: &'q Checkpoint,
    saga_id: &'q str,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    let (status, next_step, failure_reason) = checkpoint.state_columns();
    query
        .bind(i64::from(checkpoint.complete))
        .bind(status)
        .bind(next_step)
        .bind(failure_reason)
        .bind(now_ms())
        .bind(i64::from(checkpoint.enter_pivot))
        .bind(saga_id)
        .bind(checkpoint.epoch)
}

pub(crate) async fn apply(
    conn: &mut AnyConnection,
    checkpoint: &Checkpoint,
) -> Result<Applied, sqlx::Error> {
    let id = checkpoint.saga_id.to_string();
    let row = bind_state(sqlx::query(APPLY_STATE), checkpoint, &id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return not_moved(conn, &id).await;
    };
    for step in &checkpoint.steps {
        upsert_step(conn, checkpoint.saga_id, step, checkpoint.epoch).await?;
    }
    moved(conn, checkpoint, Moved::read(&row)?).await
}

/// What the fenced update of a saga's row returned.
pub(crate) struct Moved {
    pub status: String,
    pub cancel_requested: bool,
    pub pivot_passed: bool,
    pub updated_at_ms: i64,
}

impl Moved {
    pub(crate) fn read(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Moved {
            status: row.try_get("status")?,
            cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
            pivot_passed: row.try_get::<i64, _>("pivot_passed")? == 1,
            updated_at_ms: row.try_get("updated_at_ms")?,
        })
    }
}

/// The checkpoint's saga moved: its events go with it (unless a completion
/// was refused), and the driver learns what was granted.
pub(crate) async fn moved(
    conn: &mut AnyConnection,
    checkpoint: &Checkpoint,
    row: Moved,
) -> Result<Applied, sqlx::Error> {
    let applied = moved_apart_from_events(conn, checkpoint, row).await?;
    if checkpoint.announces(applied.completed) {
        for event in &checkpoint.events {
            events::insert(conn, event).await?;
        }
    }
    Ok(applied)
}

/// [`moved`] for a checkpoint whose events are written apart or were
/// written by the statement that moved its saga (`log::postgres`), or that
/// has none: its attempts are recorded, and the driver learns what was
/// granted.
pub(crate) async fn moved_apart_from_events(
    conn: &mut AnyConnection,
    checkpoint: &Checkpoint,
    row: Moved,
) -> Result<Applied, sqlx::Error> {
    insert_attempts(conn, checkpoint).await?;
    Ok(Applied {
        cancel_requested: row.cancel_requested,
        pivot_entered: checkpoint.enter_pivot && row.pivot_passed,
        completed: checkpoint.complete && row.status == "COMPLETED",
        closed: None,
        fenced: false,
        updated_at_ms: row.updated_at_ms,
    })
}

/// The fenced update matched no row: the saga is already terminal (this
/// checkpoint was applied before and its COMMIT's reply was lost, or another
/// driver ended it), or still open but claimed since by another replica.
/// Nothing to write either way; its status says which.
pub(crate) async fn not_moved(conn: &mut AnyConnection, id: &str) -> Result<Applied, sqlx::Error> {
    let status: String = sqlx::query_scalar(SAGA_STATUS)
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    let status = SagaStatus::parse(&status)
        .ok_or_else(|| decode_error(format!("saga status {status:?}")))?;
    Ok(Applied::refused(status))
}

/// A saga that is not terminal, as recovery finds it.
#[derive(Debug, Clone)]
pub struct OpenSaga {
    pub saga_id: Uuid,
    pub data_json: String,
    pub status: SagaStatus,
    pub next_step: i64,
    pub cancel_requested: bool,
    pub failure_reason: String,
    pub trace_context: String,
    /// Whether any compensation was begun (a saga that undid nothing after a
    /// failure ends FAILED, not COMPENSATED).
    pub undid_any: bool,
    /// The epoch it is held at; its driver writes under it.
    pub epoch: i64,
}

const OPEN_SAGA_COLUMNS: &str = "s.saga_id, s.data, s.status, s.next_step, s.cancel_requested, \
     s.failure_reason, s.trace_context, s.epoch, \
     (SELECT COUNT(*) FROM saga_steps c WHERE c.saga_id = s.saga_id AND c.phase = 'compensation') AS undone";

/// Every open saga of `kind`, oldest first.
pub async fn load_open(pool: &AnyPool, kind: &str) -> Result<Vec<OpenSaga>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {OPEN_SAGA_COLUMNS} FROM sagas s \
         WHERE s.kind = $1 AND s.status IN ('RUNNING', 'COMPENSATING') ORDER BY s.created_at_ms"
    )))
    .bind(kind)
    .fetch_all(pool)
    .await?;
    rows.iter().map(open_saga).collect()
}

/// One saga of `kind`, if it is open.
pub async fn load_one_open(
    pool: &AnyPool,
    kind: &str,
    saga_id: Uuid,
) -> Result<Option<OpenSaga>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {OPEN_SAGA_COLUMNS} FROM sagas s \
         WHERE s.saga_id = $1 AND s.kind = $2 AND s.status IN ('RUNNING', 'COMPENSATING')"
    )))
    .bind(saga_id.to_string())
    .bind(kind)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(open_saga).transpose()
}

fn open_saga(row: &sqlx::any::AnyRow) -> Result<OpenSaga, sqlx::Error> {
    let id: String = row.try_get("saga_id")?;
    let status: String = row.try_get("status")?;
    Ok(OpenSaga {
        saga_id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        data_json: row.try_get("data")?,
        status: SagaStatus::parse(&status)
            .ok_or_else(|| decode_error(format!("saga status {status:?}")))?,
        next_step: row.try_get("next_step")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        failure_reason: row.try_get("failure_reason")?,
        trace_context: row.try_get("trace_context")?,
        undid_any: row.try_get::<i64, _>("undone")? > 0,
        epoch: row.try_get("epoch")?,
    })
}

fn decode_error(what: String) -> sqlx::Error {
    sqlx::Error::Decode(format!("unexpected {what} in the saga log").into())
}

/// A step as shown to users.
#[derive(Debug, Clone)]
pub struct StepView {
    pub name: String,
    pub phase: Phase,
    pub index: i64,
    pub status: StepStatus,
    pub attempts: u32,
    pub last_error: String,
    pub output: String,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

/// A saga as shown to users: its state and its step history, forward steps
/// first, then compensations in the order they ran. `steps` are the log's
/// records: the forward step a RUNNING saga runs now is none of them until
/// it ends. `Engine::view` adds it (see [`SagaView::running_step`]). A view
/// handed over with a change (`SagaChange::view`) needs none: it is only
/// ever the saga at its end, when no step runs.
#[derive(Debug, Clone)]
pub struct SagaView {
    pub saga_id: Uuid,
    /// Its definition's kind: whose step names [`SagaView::running_step`] takes.
    pub kind: String,
    pub data_json: String,
    pub status: SagaStatus,
    pub pivot_passed: bool,
    pub cancel_requested: bool,
    pub failure_reason: String,
    pub trace_context: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub steps: Vec<StepView>,
}

pub(crate) const VIEW_SAGA: &str = "SELECT data, status, pivot_passed, cancel_requested, failure_reason, trace_context, created_at_ms, updated_at_ms, kind \
     FROM sagas WHERE saga_id = $1";
pub(crate) const VIEW_STEPS: &str = "SELECT name, phase, step_index, status, attempts, last_error, output, started_at_ms, finished_at_ms \
     FROM saga_steps WHERE saga_id = $1";

/// [`VIEW_SAGA`] and [`VIEW_STEPS`] in one round trip (and one snapshot): a
/// row per step, the saga's columns on each, one row with no step columns
/// for a saga without steps.
const VIEW_SAGA_WITH_STEPS: &str = "SELECT s.data, s.status AS saga_status, s.pivot_passed, s.cancel_requested, \
       s.failure_reason, s.trace_context, s.created_at_ms, s.updated_at_ms, s.kind, \
       st.name, st.phase, st.step_index, st.status AS step_status, st.attempts, st.last_error, st.output, \
       st.started_at_ms, st.finished_at_ms \
     FROM sagas s LEFT JOIN saga_steps st ON st.saga_id = s.saga_id WHERE s.saga_id = $1";

impl SagaView {
    /// A saga as [`insert_saga`] (and every statement that admits one)
    /// records it: RUNNING at its first step, with no step record yet.
    pub(crate) fn recorded(saga: &NewSaga) -> SagaView {
        SagaView {
            saga_id: saga.saga_id,
            kind: saga.kind.to_owned(),
            data_json: saga.data_json.clone(),
            status: SagaStatus::Running,
            pivot_passed: saga.starts_at_pivot,
            cancel_requested: false,
            failure_reason: String::new(),
            trace_context: saga.trace_context.clone(),
            created_at_ms: saga.at_ms,
            updated_at_ms: saga.at_ms,
            steps: vec![],
        }
    }

    /// The forward step a RUNNING saga runs now, shown as RUNNING since the
    /// step before it ended (since the saga was created, for its first);
    /// `step_names` are its definition's, in order.
    ///
    /// It is no record in the log: a step is written once, when it ends,
    /// and the saga's row (RUNNING, moved past the steps before) already
    /// says which step runs. Writing its start too cost a row version and
    /// an index probe per step on the hot path. `None` when the saga does
    /// not run forward, when every step is done, or when the log holds the
    /// step's own record (one written as started by an older version).
    pub fn running_step(&self, step_names: &[&str]) -> Option<StepView> {
        if self.status != SagaStatus::Running {
            return None;
        }
        let forward = || self.steps.iter().filter(|s| s.phase == Phase::Forward);
        if forward().any(|s| s.status == StepStatus::Running) {
            return None;
        }
        let before = forward().max_by_key(|s| s.index);
        let index = before.map_or(0, |s| s.index + 1);
        let name = step_names.get(usize::try_from(index).ok()?)?;
        // Not the row's `updated_at_ms`: an accepted cancel moves that.
        let since = before.map_or(Some(self.created_at_ms), |s| s.finished_at_ms);
        Some(StepView {
            name: (*name).to_owned(),
            phase: Phase::Forward,
            index,
            status: StepStatus::Running,
            attempts: 0,
            last_error: String::new(),
            output: String::new(),
            started_at_ms: since,
            finished_at_ms: None,
        })
    }

    /// This view with [`SagaView::running_step`] among its steps.
    pub fn with_running_step(mut self, step_names: &[&str]) -> SagaView {
        if let Some(step) = self.running_step(step_names) {
            self.steps.push(step);
            sort_steps(&mut self.steps);
        }
        self
    }

    /// The saga once `checkpoint` is applied as `applied` says (it moved
    /// the saga: not closed, not fenced), as the log's statements leave it
    /// ([`APPLY_STATE`] and the upsert of each step record): a driver that
    /// recorded its saga keeps it so, and its waiters need not read it.
    pub(crate) fn apply(&mut self, checkpoint: &Checkpoint, applied: &Applied) {
        if checkpoint.complete {
            // Refused (a cancel came first), the saga stays RUNNING.
            self.status = match applied.completed {
                true => SagaStatus::Completed,
                false => SagaStatus::Running,
            };
        } else if let Some(state) = &checkpoint.state {
            self.status = state.status;
        }
        if let Some(state) = &checkpoint.state {
            self.failure_reason.clone_from(&state.failure_reason);
        }
        self.cancel_requested = applied.cancel_requested;
        self.pivot_passed |= applied.pivot_entered;
        // As written (the writer stamps it when it binds the statement).
        self.updated_at_ms = applied.updated_at_ms;
        for record in &checkpoint.steps {
            let stored = self
                .steps
                .iter_mut()
                .find(|s| s.phase == record.phase && s.index == record.index);
            match stored {
                Some(step) => {
                    step.status = record.status;
                    step.attempts = record.attempts;
                    step.last_error.clone_from(&record.last_error);
                    step.output.clone_from(&record.output);
                    step.finished_at_ms = record.finished_at_ms;
                    step.started_at_ms = step.started_at_ms.or(record.started_at_ms);
                }
                None => self.steps.push(StepView::recorded(record)),
            }
        }
        sort_steps(&mut self.steps);
    }
}

impl StepView {
    /// A step record as its first upsert stores it.
    fn recorded(record: &StepRecord) -> StepView {
        StepView {
            name: record.name.to_owned(),
            phase: record.phase,
            index: record.index,
            status: record.status,
            attempts: record.attempts,
            last_error: record.last_error.clone(),
            output: record.output.clone(),
            started_at_ms: record.started_at_ms,
            finished_at_ms: record.finished_at_ms,
        }
    }
}

/// Forward steps first, then compensations in the order they ran.
pub(crate) fn sort_steps(steps: &mut [StepView]) {
    steps.sort_by_key(|s| match s.phase {
        Phase::Forward => (0, s.index),
        Phase::Compensation => (1, -s.index),
    });
}

pub async fn load_view(
    conn: &mut AnyConnection,
    saga_id: Uuid,
) -> Result<Option<SagaView>, sqlx::Error> {
    let rows = sqlx::query(VIEW_SAGA_WITH_STEPS)
        .bind(saga_id.to_string())
        .fetch_all(&mut *conn)
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let status: String = row.try_get("saga_status")?;
    let mut steps = Vec::with_capacity(rows.len());
    for r in &rows {
        let Some(name) = r.try_get::<Option<String>, _>("name")? else {
            continue;
        };
        let phase: String = r.try_get("phase")?;
        let step_status: String = r.try_get("step_status")?;
        steps.push(StepView {
            name,
            phase: Phase::parse(&phase).ok_or_else(|| decode_error(format!("phase {phase:?}")))?,
            index: r.try_get("step_index")?,
            status: StepStatus::parse(&step_status)
                .ok_or_else(|| decode_error(format!("step status {step_status:?}")))?,
            attempts: r.try_get::<i64, _>("attempts")? as u32,
            last_error: r.try_get("last_error")?,
            output: r.try_get("output")?,
            started_at_ms: r.try_get("started_at_ms")?,
            finished_at_ms: r.try_get("finished_at_ms")?,
        });
    }
    sort_steps(&mut steps);
    Ok(Some(SagaView {
        saga_id,
        kind: row.try_get("kind")?,
        data_json: row.try_get("data")?,
        status: SagaStatus::parse(&status)
            .ok_or_else(|| decode_error(format!("saga status {status:?}")))?,
        pivot_passed: row.try_get::<i64, _>("pivot_passed")? != 0,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        failure_reason: row.try_get("failure_reason")?,
        trace_context: row.try_get("trace_context")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        steps,
    }))
}

/// The answer to a cancellation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Recorded: the saga will compensate its done steps and end CANCELLED.
    Accepted,
    /// Asked before; nothing more to do.
    AlreadyRequested,
    /// The pivot has begun: too late to cancel.
    PastPivot,
    /// The saga is already compensating after a failure, or is terminal.
    NotRunning(SagaStatus),
    NotFound,
}

pub(crate) const CANCEL: &str = "UPDATE sagas SET cancel_requested = 1, updated_at_ms = $1 \
     WHERE saga_id = $2 AND status = 'RUNNING' AND pivot_passed = 0 AND cancel_requested = 0";

pub(crate) const CANCEL_REFUSED_BECAUSE: &str =
    "SELECT status, pivot_passed, cancel_requested FROM sagas WHERE saga_id = $1";

/// Records a cancellation request, through the log writer (see
/// [`LogWriter::cancel`]); in the caller's transaction.
pub(crate) async fn request_cancel(
    conn: &mut AnyConnection,
    saga_id: Uuid,
) -> Result<CancelOutcome, sqlx::Error> {
    let id = saga_id.to_string();
    let accepted = sqlx::query(CANCEL)
        .bind(now_ms())
        .bind(&id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if accepted == 1 {
        return Ok(CancelOutcome::Accepted);
    }
    let Some(row) = sqlx::query(CANCEL_REFUSED_BECAUSE)
        .bind(&id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(CancelOutcome::NotFound);
    };
    let status: String = row.try_get("status")?;
    let status = SagaStatus::parse(&status)
        .ok_or_else(|| decode_error(format!("saga status {status:?}")))?;
    Ok(CancelOutcome::refused(
        status,
        row.try_get::<i64, _>("pivot_passed")? != 0,
        row.try_get::<i64, _>("cancel_requested")? != 0,
    ))
}

impl CancelOutcome {
    /// Why a cancel that changed nothing was refused, from the saga's row.
    pub(crate) fn refused(status: SagaStatus, pivot_passed: bool, cancel_requested: bool) -> Self {
        if cancel_requested {
            CancelOutcome::AlreadyRequested
        } else if status == SagaStatus::Running || (pivot_passed && status == SagaStatus::Completed)
        {
            // Still running but not cancellable means the pivot has begun.
            CancelOutcome::PastPivot
        } else {
            CancelOutcome::NotRunning(status)
        }
    }
}

/// An operator's action on a saga that rests NEEDS_ATTENTION: it goes back
/// to COMPENSATING and is driven again, from the compensation that failed
/// (run again, under the same request_id to the service) or, when a person
/// undid that step's effect by hand, from the one before it.
#[derive(Debug, Clone)]
pub struct Reopen {
    pub saga_id: Uuid,
    /// The action's own idempotency key.
    pub request_id: String,
    /// `Some(note)`: the failed compensation's effect was undone by hand;
    /// the note (who, why) becomes its output and joins the failure reason.
    pub resolved_by_hand: Option<String>,
}

impl Reopen {
    /// What is kept with the action: a resolve's note, else nothing.
    pub(crate) fn note(&self) -> &str {
        self.resolved_by_hand.as_deref().unwrap_or("")
    }

    pub(crate) fn action(&self) -> &'static str {
        if self.resolved_by_hand.is_some() {
            "resolve_by_hand"
        } else {
            "retry_compensation"
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReopenOutcome {
    /// Back to COMPENSATING; the caller drives it.
    Reopened,
    /// This request_id did this to this saga before: nothing more to do.
    Replayed,
    /// This request_id was used for another saga or another action.
    RequestIdReused,
    /// The saga does not rest NEEDS_ATTENTION.
    NotResting(SagaStatus),
    NotFound,
}

pub(crate) const ACTION_SEEN: &str =
    "SELECT saga_id, action, note FROM saga_actions WHERE request_id = $1";
pub(crate) const RESTING: &str =
    "SELECT status, next_step, failure_reason FROM sagas WHERE saga_id = $1";
pub(crate) const RESOLVE_STEP: &str = "UPDATE saga_steps SET status = 'SUCCEEDED', output = $1, finished_at_ms = $2 \
     WHERE saga_id = $3 AND phase = 'compensation' AND step_index = $4";
/// Claimed for `owner` (a replica's ID; `''` alone keeps it) at a new epoch.
pub(crate) const REOPEN: &str = "UPDATE sagas SET status = 'COMPENSATING', next_step = $1, \
     owner = CASE WHEN $2 = '' THEN owner ELSE $2 END, epoch = epoch + 1, failure_reason = $3, updated_at_ms = $4 \
     WHERE saga_id = $5 AND status = 'NEEDS_ATTENTION'";
pub(crate) const RECORD_ACTION: &str = "INSERT INTO saga_actions (request_id, saga_id, action, note, at_ms) \
     VALUES ($1, $2, $3, $4, $5)";

/// What a reopen writes, once the saga's row was read: the next step and
/// failure reason it resumes with, or why it does not.
pub(crate) fn plan_reopen(
    reopen: &Reopen,
    seen: Option<(String, String, String)>,
    resting: Option<(SagaStatus, i64, String)>,
) -> Result<(i64, String), ReopenOutcome> {
    if let Some((saga_id, action, note)) = seen {
        // The same request: the same saga, action and note (a resolve's
        // operator and reason); anything else under its ID is refused.
        return Err(
            if saga_id == reopen.saga_id.to_string()
                && action == reopen.action()
                && note == reopen.note()
            {
                ReopenOutcome::Replayed
            } else {
                ReopenOutcome::RequestIdReused
            },
        );
    }
    let Some((status, next_step, failure_reason)) = resting else {
        return Err(ReopenOutcome::NotFound);
    };
    if status != SagaStatus::NeedsAttention {
        return Err(ReopenOutcome::NotResting(status));
    }
    Ok(match &reopen.resolved_by_hand {
        None => (next_step, failure_reason),
        // The step before it, or none left (-1): the saga then ends.
        Some(note) => (next_step - 1, format!("{failure_reason}; {note}")),
    })
}

/// Reopens a resting saga (see [`Reopen`]), through the log writer; in the
/// caller's transaction.
///
/// The saga's row is written first, and only while it still rests: on
/// PostgreSQL each action is a transaction of its own, and two at once both
/// read the saga resting. The second waits here for the first's row lock,
/// then finds the saga reopened and writes nothing (before, it resolved the
/// step again under its own note and was answered Reopened too).
pub(crate) async fn reopen(
    conn: &mut AnyConnection,
    reopen: &Reopen,
    owner: &str,
) -> Result<ReopenOutcome, sqlx::Error> {
    let id = reopen.saga_id.to_string();
    let (next_step, failure_reason) = match read_reopen_plan(conn, reopen).await? {
        Ok(plan) => plan,
        Err(outcome) => return Ok(outcome),
    };
    let now = now_ms();
    let reopened = sqlx::query(REOPEN)
        .bind(next_step)
        .bind(owner)
        .bind(&failure_reason)
        .bind(now)
        .bind(&id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if reopened == 0 {
        // Another action committed between the read and the write: read
        // again (its commit is seen now), having written nothing.
        return match read_reopen_plan(conn, reopen).await? {
            Err(outcome) => Ok(outcome),
            Ok(_) => Err(sqlx::Error::Protocol(format!(
                "saga {id} changed while it was reopened; try again"
            ))),
        };
    }
    if let Some(note) = &reopen.resolved_by_hand {
        sqlx::query(RESOLVE_STEP)
            .bind(note)
            .bind(now)
            .bind(&id)
            .bind(next_step + 1)
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(RECORD_ACTION)
        .bind(&reopen.request_id)
        .bind(&id)
        .bind(reopen.action())
        .bind(reopen.note())
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(ReopenOutcome::Reopened)
}

/// [`plan_reopen`] on what the store holds now.
async fn read_reopen_plan(
    conn: &mut AnyConnection,
    reopen: &Reopen,
) -> Result<Result<(i64, String), ReopenOutcome>, sqlx::Error> {
    let seen = sqlx::query(ACTION_SEEN)
        .bind(&reopen.request_id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|row| {
            Ok::<_, sqlx::Error>((
                row.try_get("saga_id")?,
                row.try_get("action")?,
                row.try_get("note")?,
            ))
        })
        .transpose()?;
    let resting = sqlx::query(RESTING)
        .bind(reopen.saga_id.to_string())
        .fetch_optional(&mut *conn)
        .await?
        .map(|row| {
            let status: String = row.try_get("status")?;
            let status = SagaStatus::parse(&status)
                .ok_or_else(|| decode_error(format!("saga status {status:?}")))?;
            Ok::<_, sqlx::Error>((
                status,
                row.try_get("next_step")?,
                row.try_get("failure_reason")?,
            ))
        })
        .transpose()?;
    Ok(plan_reopen(reopen, seen, resting))
}

/// The relay's writes to the outbox (they go through the log writer too).
pub(crate) const MARK_SENT: &str = "UPDATE outbox SET sent_at_ms = $1 WHERE id = $2";
pub(crate) const PRUNE_SENT: &str =
    "DELETE FROM outbox WHERE sent_at_ms IS NOT NULL AND sent_at_ms < $1";

/// Retries a log commit until it succeeds: the saga must not move on without
/// its record. Waits grow to `cap`.
pub fn commit_backoff(attempt: u32, cap: Duration) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(10))).min(cap)
}
