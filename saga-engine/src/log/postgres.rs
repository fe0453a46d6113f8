//! A batch of checkpoints in one statement, on PostgreSQL.
//!
//! Applied one by one, a checkpoint costs a round trip for its saga's row and
//! one per step record, and PostgreSQL's CPU per saga went mostly to those
//! round trips, not to the rows. Here the batch travels as three JSON
//! parameters and one statement applies it: a fenced update of every saga's
//! row (the same rules as [`super::APPLY_STATE`]), then the step records and
//! the events of exactly the sagas that update matched, with the epoch it
//! matched. What it returns is what `APPLY_STATE` returns, one row per saga
//! that moved.
//!
//! The events go in the same statement, not in one of their own after it:
//! each saga's event counter is bumped by the same update that moves its
//! row, so the row is written once per checkpoint rather than twice, and the
//! batch costs one statement fewer (its own JSON parsed, its own plan). The
//! rules are [`crate::events`]': an event written before is skipped and takes
//! no number, and a completion refused because a cancel came first announces
//! nothing.
//!
//! The sagas' rows are found through the key's index, by `= ANY` of an
//! array of the batch's IDs: joined only with the JSON as a table (which
//! the planner guesses at 100 rows), the rows were found by hashing against
//! a scan of the whole table whenever the table was small enough for that
//! to look cheaper, and a scan's cost grows with every saga ever run. The
//! events written before are found the same way. The writer's connections
//! plan with no sequential or bitmap scans (`writer::planning_by_key`), and
//! the open statuses come from `c` (`open_statuses`), not as constants:
//! given `status IN ('RUNNING', 'COMPENSATING')`, the planner read the
//! partial index of open sagas whole (its entries stay until vacuum) and
//! filtered it by ID.
//!
//! A saga may appear once per batch (one `UPDATE … FROM` sets a row once);
//! the writer sends a batch with a saga twice one checkpoint at a time.

use std::{
    collections::{HashMap, HashSet},
    sync::{LazyLock, Mutex},
};

use serde::Serialize;
use serde_json::Value;
use sqlx::{AnyConnection, Row};
use uuid::Uuid;

use super::{
    APPLY_STATE, Admitting, Applied, Checkpoint, Moved, ToAdmit, admission_ctes, bind_state,
    bind_step, built_once, moved_apart_from_events, not_moved, told_cte,
};
use crate::{
    engine::Admission,
    events::{self, fresh_events_ctes},
    notifications, now_ms,
};

/// The batch's work, shared by [`APPLY_BATCH`] and [`APPLY_BATCH_TOLD`]: a
/// macro, so that both stay `concat!`-ed literals. `moved` also returns
/// what each moved saga's notice says (see [`super::writer`]'s `notices`):
/// the status the checkpoint set, `COMPLETED` for a completion that took,
/// `-` for one refused because a cancel came first, or for none.
macro_rules! apply_batch_ctes {
    () => {
        concat!(
    "WITH c AS ( \
       SELECT c.*, '{RUNNING,COMPENSATING}'::text[] AS open_statuses \
       FROM jsonb_to_recordset($1::jsonb) AS c(saga_id text, epoch bigint, complete boolean, \
         enter_pivot boolean, status text, next_step bigint, failure_reason text)), ",
    fresh_events_ctes!("$4"),
    ", \
     moved AS ( \
       UPDATE sagas s SET \
         status = CASE WHEN c.complete THEN (CASE WHEN s.cancel_requested = 0 THEN 'COMPLETED' ELSE 'RUNNING' END) \
                  ELSE COALESCE(c.status, s.status) END, \
         next_step = COALESCE(c.next_step, s.next_step), \
         failure_reason = COALESCE(c.failure_reason, s.failure_reason), updated_at_ms = $3, \
         pivot_passed = CASE WHEN c.enter_pivot AND s.cancel_requested = 0 THEN 1 ELSE s.pivot_passed END, \
         events_sequence = s.events_sequence + \
           CASE WHEN c.complete AND s.cancel_requested <> 0 THEN 0 ELSE COALESCE(k.n, 0) END \
       FROM c LEFT JOIN counts k ON k.aggregate_id = c.saga_id \
       WHERE s.saga_id = c.saga_id AND s.saga_id = ANY(ARRAY(SELECT saga_id FROM c)) \
         AND s.status = ANY(c.open_statuses) AND s.epoch = c.epoch \
       RETURNING s.saga_id, s.status, s.cancel_requested, s.pivot_passed, s.epoch, s.updated_at_ms, \
         s.events_sequence - COALESCE(k.n, 0) AS events_base, \
         (NOT c.complete OR s.cancel_requested = 0) AS announces, \
         CASE WHEN c.complete THEN (CASE WHEN s.status = 'COMPLETED' THEN 'COMPLETED' ELSE '-' END) \
              ELSE COALESCE(c.status, '-') END AS told_status), \
     steps AS ( \
       INSERT INTO saga_steps (saga_id, phase, step_index, name, status, attempts, last_error, output, started_at_ms, finished_at_ms, epoch) \
       SELECT st.saga_id, st.phase, st.step_index, st.name, st.status, st.attempts, st.last_error, st.output, \
              st.started_at_ms, st.finished_at_ms, m.epoch \
       FROM jsonb_to_recordset($2::jsonb) AS st(saga_id text, phase text, step_index bigint, name text, status text, \
              attempts bigint, last_error text, output text, started_at_ms bigint, finished_at_ms bigint), moved m \
       WHERE m.saga_id = st.saga_id \
       ON CONFLICT (saga_id, phase, step_index) DO UPDATE SET \
         status = excluded.status, attempts = excluded.attempts, last_error = excluded.last_error, epoch = excluded.epoch, \
         output = excluded.output, finished_at_ms = excluded.finished_at_ms, \
         started_at_ms = COALESCE(saga_steps.started_at_ms, excluded.started_at_ms)), \
     events AS ( \
       INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
       SELECT f.event_id, f.aggregate_id, m.events_base + f.n, f.event_type, f.head || (m.events_base + f.n)::text || f.tail, \
              f.traceparent, f.at_ms, m.epoch \
       FROM fresh f JOIN moved m ON m.saga_id = f.aggregate_id \
       WHERE m.announces \
       ORDER BY f.ord)"
        )
    };
}

const APPLY_BATCH: &str = concat!(
    apply_batch_ctes!(),
    " SELECT saga_id, status, cancel_requested, pivot_passed, updated_at_ms FROM moved"
);

/// [`APPLY_BATCH`] as a statement that commits alone, telling the other
/// replicas in it (`$5`, the channel; `$6`, the sender, or `NULL` for no
/// notice): a notice per moved saga, in payloads of at most 120 lines
/// (about 6,000 bytes, under PostgreSQL's 8,000; see
/// [`notifications::encode`]). The notices go out only if the statement
/// commits, as they would with a transaction's.
const APPLY_BATCH_TOLD: &str = concat!(
    apply_batch_ctes!(),
    ", ",
    told_cte!("$5", "$6", "SELECT saga_id, told_status FROM moved"),
    " SELECT saga_id, status, cancel_requested, pivot_passed, updated_at_ms, \
       (SELECT count(*) FROM told) AS told \
     FROM moved"
);

/// Whether [`apply_batch`] can take these checkpoints: each saga once, and
/// each announcing only events of its own saga (whose counter numbers them).
pub(crate) fn fits_batch<'a>(checkpoints: impl Iterator<Item = &'a Checkpoint>) -> bool {
    let mut seen = HashSet::new();
    checkpoints
        .into_iter()
        .all(|c| seen.insert(c.saga_id) && c.events.iter().all(|e| e.aggregate_id == c.saga_id))
}

/// Applies `checkpoints` (each saga at most once) inside the caller's
/// transaction, with the events the moved sagas announce; the results come
/// in the same order.
pub(crate) async fn apply_batch(
    conn: &mut AnyConnection,
    checkpoints: &[&Checkpoint],
) -> Result<Vec<Applied>, sqlx::Error> {
    run_batch(conn, checkpoints, None).await
}

/// Whether [`apply_batch_alone`] can take these checkpoints: they
/// [`fits_batch`], and none leaves anything to write after the statement
/// (retried attempts), which would commit apart from it.
pub(crate) fn fits_batch_alone<'a>(
    checkpoints: impl Iterator<Item = &'a Checkpoint> + Clone,
) -> bool {
    fits_batch(checkpoints.clone())
        && checkpoints
            .flat_map(|c| &c.steps)
            .all(|s| s.attempt_log.is_empty())
}

/// Applies checkpoints that [`fits_batch_alone`] as one statement outside
/// any transaction: it commits with the statement, and with `notify_as` the
/// other replicas hear of it in the same commit. In a transaction the batch
/// cost three round trips more (`BEGIN`, `pg_notify`, `COMMIT`), each on the
/// path of every saga in it.
pub(crate) async fn apply_batch_alone(
    conn: &mut AnyConnection,
    checkpoints: &[&Checkpoint],
    notify_as: Option<Uuid>,
) -> Result<Vec<Applied>, sqlx::Error> {
    debug_assert!(fits_batch_alone(checkpoints.iter().copied()));
    run_batch(conn, checkpoints, Some(notify_as)).await
}

/// [`APPLY_BATCH`], or with `told` (the sender, if any) [`APPLY_BATCH_TOLD`].
async fn run_batch(
    conn: &mut AnyConnection,
    checkpoints: &[&Checkpoint],
    told: Option<Option<Uuid>>,
) -> Result<Vec<Applied>, sqlx::Error> {
    let (sagas, steps, events) = parameters(checkpoints);
    let sql = match told {
        Some(_) => APPLY_BATCH_TOLD,
        None => APPLY_BATCH,
    };
    let mut query = sqlx::query(sql)
        .bind(sagas)
        .bind(steps)
        .bind(now_ms())
        .bind(events);
    if let Some(sender) = told {
        query = query
            .bind(notifications::CHANGES)
            .bind(sender.map(|sender| sender.to_string()));
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut moved_rows = HashMap::with_capacity(rows.len());
    for row in rows {
        let saga_id: String = row.try_get("saga_id")?;
        moved_rows.insert(saga_id, Moved::read(&row)?);
    }
    applied(conn, checkpoints, moved_rows).await
}

/// Each checkpoint's result, given the rows of the sagas a batch statement
/// moved (by ID).
async fn applied(
    conn: &mut AnyConnection,
    checkpoints: &[&Checkpoint],
    mut moved_rows: HashMap<String, Moved>,
) -> Result<Vec<Applied>, sqlx::Error> {
    let mut results = Vec::with_capacity(checkpoints.len());
    for checkpoint in checkpoints {
        let id = checkpoint.saga_id.to_string();
        results.push(match moved_rows.remove(&id) {
            Some(row) => moved_apart_from_events(conn, checkpoint, row).await?,
            None => not_moved(conn, &id).await?,
        });
    }
    Ok(results)
}

/// [`APPLY_BATCH_TOLD`] with new sagas admitted in the same statement
/// ([`admission_ctes`]: `$7` the callers' rows, `$8` the sagas), their
/// notices with the checkpoints'. In a transaction such a batch took
/// `BEGIN`, its two statements, `pg_notify` and `COMMIT`: five round trips
/// on the path of every saga in it. Its rows: each moved saga's, then each
/// admitted saga's (`admitted`, with those recorded before: see
/// [`admission_ctes`]). Built once per caller's statement.
fn batch_admitting_sql(rows_sql: &'static str) -> &'static str {
    static BUILT: LazyLock<Mutex<HashMap<&'static str, &'static str>>> =
        LazyLock::new(Mutex::default);
    built_once(rows_sql, build_batch_admitting_sql, &BUILT)
}

fn build_batch_admitting_sql(rows_sql: &str) -> String {
    format!(
        concat!(
            "{}, {}, ",
            told_cte!(
                "$5",
                "$6",
                "SELECT saga_id, told_status FROM moved UNION ALL SELECT saga_id, 'RUNNING' FROM new_saga"
            ),
            " SELECT saga_id, status, cancel_requested, pivot_passed, updated_at_ms, false AS admitted, \
               (SELECT COUNT(*) FROM told) AS told FROM moved \
             UNION ALL \
             SELECT saga_id, NULL, NULL, NULL, NULL, true, (SELECT COUNT(*) FROM told) FROM new_saga \
             UNION ALL \
             SELECT saga_id, NULL, NULL, NULL, NULL, true, 0 FROM recorded"
        ),
        apply_batch_ctes!(),
        admission_ctes(rows_sql, "$7", "$8"),
    )
}

/// Applies checkpoints that [`fits_batch_alone`] and admits new sagas whose
/// callers share the statement `rows_sql` (each writing its events in it,
/// at most [`super::MOST_ADMITTED_AT_ONCE`]), as one statement outside any
/// transaction: it commits with the statement, and with `notify_as` the
/// other replicas hear of it in the same commit. The checkpoints' results
/// and the sagas' answers come in the order given.
pub(crate) async fn apply_batch_admitting(
    conn: &mut AnyConnection,
    checkpoints: &[&Checkpoint],
    rows_sql: &'static str,
    starts: &[ToAdmit<'_>],
    notify_as: Option<Uuid>,
) -> Result<(Vec<Applied>, Vec<Admission>), sqlx::Error> {
    debug_assert!(fits_batch_alone(checkpoints.iter().copied()));
    debug_assert!(starts.len() <= super::MOST_ADMITTED_AT_ONCE);
    let (sagas, steps, events) = parameters(checkpoints);
    let admitting = Admitting::new(starts);
    let rows = sqlx::query(batch_admitting_sql(rows_sql))
        .bind(sagas)
        .bind(steps)
        .bind(now_ms())
        .bind(events)
        .bind(notifications::CHANGES)
        .bind(notify_as.map(|sender| sender.to_string()))
        .bind(&admitting.rows)
        .bind(&admitting.sagas)
        .fetch_all(&mut *conn)
        .await?;
    let mut moved_rows = HashMap::with_capacity(checkpoints.len());
    let mut admitted = HashSet::with_capacity(starts.len());
    for row in rows {
        let saga_id: String = row.try_get("saga_id")?;
        match row.try_get::<bool, _>("admitted")? {
            true => {
                admitted.insert(saga_id);
            }
            false => {
                moved_rows.insert(saga_id, Moved::read(&row)?);
            }
        }
    }
    let applied = applied(conn, checkpoints, moved_rows).await?;
    Ok((applied, admitting.answers(&admitted)))
}

/// The batch as the statement's three JSON arrays: the sagas' new state,
/// every step record, and every event. Serialized straight from these rows:
/// built as `serde_json::Value`s first, they cost the orchestrator about 7 %
/// of its CPU under load (a map and a string per field).
fn parameters(checkpoints: &[&Checkpoint]) -> (String, String, String) {
    #[derive(Serialize)]
    struct SagaRow<'a> {
        saga_id: &'a str,
        epoch: i64,
        complete: bool,
        enter_pivot: bool,
        status: Option<&'a str>,
        next_step: Option<i64>,
        failure_reason: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct StepRow<'a> {
        saga_id: &'a str,
        phase: &'a str,
        step_index: i64,
        name: &'a str,
        status: &'a str,
        attempts: u32,
        last_error: &'a str,
        output: &'a str,
        started_at_ms: Option<i64>,
        finished_at_ms: Option<i64>,
    }
    let ids: Vec<String> = checkpoints.iter().map(|c| c.saga_id.to_string()).collect();
    let mut sagas = Vec::with_capacity(checkpoints.len());
    let mut steps = Vec::with_capacity(checkpoints.len() * 2);
    let mut events = Vec::new();
    let at_ms = now_ms();
    for (checkpoint, saga_id) in checkpoints.iter().zip(&ids) {
        let (status, next_step, failure_reason) = checkpoint.state_columns();
        sagas.push(SagaRow {
            saga_id,
            epoch: checkpoint.epoch,
            complete: checkpoint.complete,
            enter_pivot: checkpoint.enter_pivot,
            status,
            next_step,
            failure_reason,
        });
        for step in &checkpoint.steps {
            steps.push(StepRow {
                saga_id,
                phase: step.phase.as_str(),
                step_index: step.index,
                name: step.name,
                status: step.status.as_str(),
                attempts: step.attempts,
                last_error: &step.last_error,
                output: &step.output,
                started_at_ms: step.started_at_ms,
                finished_at_ms: step.finished_at_ms,
            });
        }
        for event in &checkpoint.events {
            events.push(events::numbered_later(events.len(), event, at_ms));
        }
    }
    let serialized = "the batch's rows serialize";
    (
        serde_json::to_string(&sagas).expect(serialized),
        serde_json::to_string(&steps).expect(serialized),
        serde_json::to_string(&events).expect(serialized),
    )
}

/// A checkpoint that commits alone (nothing else waited for the log) as one
/// statement, with no transaction around it: its saga's fenced update (the
/// rules of [`super::APPLY_STATE`]), its step records, and the notice to the
/// other replicas. Statement by statement in a transaction, it was `BEGIN`,
/// the update, one upsert per record, `pg_notify` (with replicas) and
/// `COMMIT`: up to six round trips, each on the path of a saga that runs
/// alone. A lone checkpoint with events goes as a batch of one
/// ([`apply_batch_alone`]); one with retried attempts to record, rarer,
/// still goes statement by statement.
///
/// The notice says what [`crate::notifications::encode`] would: the sender,
/// then the saga and the status the checkpoint set (`-` for none, as for a
/// completion refused because a cancel came first).
fn alone_sql(steps: usize) -> String {
    let values: Vec<String> = (0..steps)
        .map(|i| {
            let n = 11 + 9 * i;
            format!(
                "(${}::text, ${}::bigint, ${}::text, ${}::text, ${}::bigint, ${}::text, ${}::text, ${}::bigint, ${}::bigint)",
                n,
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5,
                n + 6,
                n + 7,
                n + 8
            )
        })
        .collect();
    let steps = match values.is_empty() {
        true => String::new(),
        false => format!(
            "steps AS ( \
               INSERT INTO saga_steps (saga_id, phase, step_index, name, status, attempts, last_error, output, started_at_ms, finished_at_ms, epoch) \
               SELECT m.saga_id, v.phase, v.step_index, v.name, v.status, v.attempts, v.last_error, v.output, \
                      v.started_at_ms, v.finished_at_ms, m.epoch \
               FROM moved m, (VALUES {}) AS v(phase, step_index, name, status, attempts, last_error, output, started_at_ms, finished_at_ms) \
               ON CONFLICT (saga_id, phase, step_index) DO UPDATE SET \
                 status = excluded.status, attempts = excluded.attempts, last_error = excluded.last_error, epoch = excluded.epoch, \
                 output = excluded.output, finished_at_ms = excluded.finished_at_ms, \
                 started_at_ms = COALESCE(saga_steps.started_at_ms, excluded.started_at_ms)), ",
            values.join(", ")
        ),
    };
    format!(
        "WITH moved AS ({APPLY_STATE}), \
         {steps}\
         told AS ( \
           SELECT pg_notify($9, $10 || chr(10) || m.saga_id || ' ' || \
             CASE WHEN $1 = 1 THEN (CASE WHEN m.status = 'COMPLETED' THEN 'COMPLETED' ELSE '-' END) \
                  ELSE COALESCE($2, '-') END)::text AS told \
           FROM moved m WHERE $10 IS NOT NULL) \
         SELECT m.saga_id, m.status, m.cancel_requested, m.pivot_passed, m.updated_at_ms, told.told \
         FROM moved m LEFT JOIN told ON true"
    )
}

/// Built once: [`alone_sql`] for a checkpoint of no, one and two step records.
static ALONE: LazyLock<[String; 3]> = LazyLock::new(|| [alone_sql(0), alone_sql(1), alone_sql(2)]);

/// Whether [`apply_alone`] can take `checkpoint`: no events, no retried
/// attempts to record, at most two step records (a step's result, and the
/// start of the compensation after it).
pub(crate) fn fits_alone(checkpoint: &Checkpoint) -> bool {
    checkpoint.events.is_empty()
        && checkpoint.steps.len() < ALONE.len()
        && checkpoint.steps.iter().all(|s| s.attempt_log.is_empty())
}

/// Applies a checkpoint that [`fits_alone`] as one statement, outside any
/// transaction: it commits with the statement. With `notify_as`, the other
/// replicas hear of it in the same commit.
pub(crate) async fn apply_alone(
    conn: &mut AnyConnection,
    checkpoint: &Checkpoint,
    notify_as: Option<Uuid>,
) -> Result<Applied, sqlx::Error> {
    // What it would leave for after the statement (attempts) must not be
    // written outside the statement's commit.
    debug_assert!(fits_alone(checkpoint));
    let id = checkpoint.saga_id.to_string();
    let sql = sqlx::AssertSqlSafe(ALONE[checkpoint.steps.len()].as_str());
    let mut query = bind_state(sqlx::query(sql), checkpoint, &id)
        .bind(notifications::CHANGES)
        .bind(notify_as.map(|sender| sender.to_string()));
    for step in &checkpoint.steps {
        query = bind_step(query, step);
    }
    match query.fetch_optional(&mut *conn).await? {
        Some(row) => moved_apart_from_events(conn, checkpoint, Moved::read(&row)?).await,
        None => not_moved(conn, &id).await,
    }
}

const MARK_SENT: &str = "UPDATE outbox SET sent_at_ms = $1 \
     WHERE id IN (SELECT jsonb_array_elements_text($2::jsonb)::bigint)";

/// Marks the relay's published events as sent, in one statement.
pub(crate) async fn mark_sent(
    conn: &mut AnyConnection,
    ids: &[i64],
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(MARK_SENT)
        .bind(at_ms)
        .bind(Value::from(ids).to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}
