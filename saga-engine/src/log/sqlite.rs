//! The log's writes on a SQLite file: one thread with its own connection,
//! which runs a whole batch of writes per hand-over.
//!
//! Through sqlx, every statement is a message to the connection's worker
//! thread and a reply back: two thread wake-ups per statement, about ten
//! statements per saga. Those wake-ups were the largest cost in the profile
//! (docs/benchmarks.md). Here a batch costs one hand-over each way, and the
//! statements are prepared once and cached.
//!
//! The SQL is the same text as the sqlx path's (SQLite reads `$1` as a
//! parameter), so the two can't drift apart. The sqlx pool stays open on the
//! same file for reads and the other writes; both connections wait on
//! SQLite's write lock rather than fail (`busy_timeout`).

use std::{path::PathBuf, sync::mpsc, thread, time::Duration};

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use sqlx::AnyPool;
use tokio::sync::oneshot;

use uuid::Uuid;

use super::{
    ACTION_SEEN, APPLY_STATE, Applied, CANCEL, CANCEL_REFUSED_BECAUSE, CancelOutcome, Checkpoint,
    Durability, INSERT_ATTEMPT, INSERT_SAGA, MARK_SENT, NewSaga, PRUNE_SENT, RECORD_ACTION, REOPEN,
    RESOLVE_STEP, RESTING, Reopen, ReopenOutcome, SAGA_STATUS, SagaStatus, SagaView, StepRecord,
    StepStatus, StepView, UPSERT_STEP, VIEW_SAGA, VIEW_STEPS, plan_reopen, sort_steps,
    writer::{Start, Write, Written},
};
use crate::{definition::Phase, engine::Admission, events, events::NewEvent, now_ms};

type Job = (
    Vec<Write>,
    oneshot::Sender<(Vec<Write>, Result<Vec<Written>, String>)>,
);

pub(crate) struct SqliteLog {
    jobs: mpsc::Sender<Job>,
}

impl SqliteLog {
    /// The file behind a SQLite pool; `None` for PostgreSQL and for an
    /// in-memory database (which no second connection can see).
    pub(crate) fn file_of(pool: &AnyPool) -> Option<PathBuf> {
        file_of_url(pool.connect_options().database_url.as_str())
    }

    /// Opens the (existing, migrated) file and starts the writer thread.
    pub(crate) fn open(path: &std::path::Path, durability: Durability) -> anyhow::Result<Self> {
        // No CREATE flag: a path that does not name the pool's file is an error,
        // not a second, empty database.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open the saga log at {}", path.display()))?;
        configure(&conn, durability)?;
        conn.query_row("SELECT COUNT(*) FROM sagas WHERE 0", [], |_| Ok(()))
            .with_context(|| format!("{} holds no saga log", path.display()))?;
        let (jobs, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("saga-log-sqlite".into())
            .spawn(move || run(conn, rx))
            .context("cannot start the saga log's writer thread")?;
        Ok(SqliteLog { jobs })
    }

    /// Commits `writes` as one transaction on the writer thread.
    pub(crate) async fn commit(
        &self,
        writes: Vec<Write>,
    ) -> (Vec<Write>, Result<Vec<Written>, String>) {
        let (reply, done) = oneshot::channel();
        // On a send error the job (with the writes) comes back in the error.
        if let Err(mpsc::SendError((writes, _))) = self.jobs.send((writes, reply)) {
            return (
                writes,
                Err("the saga log's writer thread has stopped".into()),
            );
        }
        done.await.unwrap_or_else(|_| {
            (
                Vec::new(),
                Err("the saga log's writer thread stopped mid-batch".into()),
            )
        })
    }
}

/// The writer connection's settings: WAL, foreign keys enforced, and each
/// commit on disk before it is acknowledged unless `durability` is relaxed.
fn configure(conn: &Connection, durability: Durability) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", durability.sqlite_synchronous())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Checkpoint the WAL every ~32 MiB rather than every 4 MiB: a page
    // changed by many commits in between is copied to the file once.
    conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
    // A batch's savepoints need a statement journal: in memory, not a
    // temporary file opened, written and unlinked at each commit.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// The file named by a SQLite URL, as sqlx reads it.
fn file_of_url(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory =
        path.is_empty() || path == ":memory:" || query.split('&').any(|kv| kv == "mode=memory");
    (!in_memory).then(|| PathBuf::from(path))
}

type Read = Box<dyn FnOnce(&Connection) + Send>;

/// Reads on a SQLite file, on a thread with its own read-only connection:
/// one hand-over per read, however many statements it runs (through sqlx,
/// each statement is a hop to the connection's thread and back). WAL lets it
/// read beside the writer.
#[derive(Clone)]
pub struct SqliteReader {
    reads: mpsc::Sender<Read>,
}

impl SqliteReader {
    pub(crate) fn open(path: &std::path::Path) -> anyhow::Result<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open the saga log at {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(32);
        let (reads, rx) = mpsc::channel::<Read>();
        thread::Builder::new()
            .name("saga-log-reader".into())
            .spawn(move || {
                while let Ok(read) = rx.recv() {
                    // A read that panics drops its reply (its caller gets an
                    // error); the thread goes on serving the others.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&conn)));
                }
            })
            .context("cannot start the saga log's reader thread")?;
        Ok(SqliteReader { reads })
    }

    /// Runs `read` on the reader's connection.
    pub async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let (reply, done) = oneshot::channel();
        self.reads
            .send(Box::new(move |conn| {
                let _ = reply.send(read(conn).map_err(|e| e.to_string()));
            }))
            .map_err(|_| "the saga log's reader thread has stopped".to_owned())?;
        done.await
            .map_err(|_| "the saga log's reader thread stopped mid-read".to_owned())?
    }
}

/// See [`super::load_view`]: the same statements, on this connection.
pub fn load_view(conn: &Connection, saga_id: Uuid) -> rusqlite::Result<Option<SagaView>> {
    let id = saga_id.to_string();
    let row = conn
        .prepare_cached(VIEW_SAGA)?
        .query_row(params![id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, String>(8)?,
            ))
        })
        .optional()?;
    let Some((
        data_json,
        status,
        pivot,
        cancel,
        failure_reason,
        trace_context,
        created,
        updated,
        kind,
    )) = row
    else {
        return Ok(None);
    };
    let mut steps = conn
        .prepare_cached(VIEW_STEPS)?
        .query_map(params![id], |r| {
            let phase: String = r.get(1)?;
            let status: String = r.get(3)?;
            Ok(StepView {
                name: r.get(0)?,
                phase: Phase::parse(&phase).ok_or_else(|| unexpected("phase", &phase))?,
                index: r.get(2)?,
                status: StepStatus::parse(&status)
                    .ok_or_else(|| unexpected("step status", &status))?,
                attempts: r.get::<_, i64>(4)? as u32,
                last_error: r.get(5)?,
                output: r.get(6)?,
                started_at_ms: r.get(7)?,
                finished_at_ms: r.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    sort_steps(&mut steps);
    Ok(Some(SagaView {
        saga_id,
        kind,
        data_json,
        status: parse_status(&status)?,
        pivot_passed: pivot != 0,
        cancel_requested: cancel != 0,
        failure_reason,
        trace_context,
        created_at_ms: created,
        updated_at_ms: updated,
        steps,
    }))
}

fn unexpected(what: &str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("unexpected {what} {value:?} in the saga log").into(),
    )
}

fn run(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    while let Ok((writes, reply)) = jobs.recv() {
        // A panic (a bug, perhaps in a caller's `admit_sqlite`) fails this
        // batch, which is rolled back, not the writer: sagas retry their writes.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            commit_batch(&mut conn, &writes).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|_| Err("a log write panicked; its batch was rolled back".into()));
        let _ = reply.send((writes, result));
    }
}

fn commit_batch(conn: &mut Connection, writes: &[Write]) -> rusqlite::Result<Vec<Written>> {
    // IMMEDIATE takes the write lock at BEGIN: a deferred transaction that
    // read first could not upgrade while the pool's connection writes.
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(writes.len());
    for write in writes {
        results.push(match write {
            Write::Checkpoint(checkpoint) => Written::Checkpoint(apply(&tx, checkpoint)?),
            Write::Start(start) => Written::Start(start_saga(&mut tx, start)?),
            Write::Cancel(saga_id) => Written::Cancel(request_cancel(&tx, *saga_id)?),
            Write::Reopen(action, owner) => Written::Reopen(reopen(&tx, action, owner)?),
            Write::EventsSent { ids, at_ms } => {
                let mut mark = tx.prepare_cached(MARK_SENT)?;
                for id in ids {
                    mark.execute(params![at_ms, id])?;
                }
                Written::Rows(ids.len() as u64)
            }
            Write::PruneSent { before_ms } => {
                Written::Rows(tx.prepare_cached(PRUNE_SENT)?.execute(params![before_ms])? as u64)
            }
        });
    }
    tx.commit()?;
    Ok(results)
}

fn start_saga(tx: &mut rusqlite::Transaction<'_>, start: &Start) -> rusqlite::Result<Admission> {
    // A savepoint, so that a refusal takes back this saga's rows and not its
    // neighbours' in the batch. Dropped without commit, it rolls back.
    let savepoint = tx.savepoint()?;
    insert_saga(&savepoint, &start.saga)?;
    if start.admit.admit_sqlite(&savepoint, start.saga.at_ms)? == Admission::Refuse {
        return Ok(Admission::Refuse);
    }
    for event in &start.events {
        insert_event(&savepoint, event)?;
    }
    savepoint.commit()?;
    Ok(Admission::Admit)
}

fn insert_saga(conn: &Connection, saga: &NewSaga) -> rusqlite::Result<()> {
    let now = saga.at_ms;
    conn.prepare_cached(INSERT_SAGA)?.execute(params![
        saga.saga_id.to_string(),
        saga.kind,
        saga.data_json,
        saga.trace_context,
        now,
        i64::from(saga.starts_at_pivot),
        saga.owner,
    ])?;
    Ok(())
}

fn upsert_step(
    conn: &Connection,
    saga_id: &str,
    step: &StepRecord,
    epoch: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(UPSERT_STEP)?.execute(params![
        saga_id,
        step.phase.as_str(),
        step.index,
        step.name,
        step.status.as_str(),
        i64::from(step.attempts),
        step.last_error,
        step.output,
        step.started_at_ms,
        step.finished_at_ms,
        epoch,
    ])?;
    Ok(())
}

fn apply(conn: &Connection, checkpoint: &Checkpoint) -> rusqlite::Result<Applied> {
    let id = checkpoint.saga_id.to_string();
    let (status, next_step, failure_reason) = checkpoint.state_columns();
    let row = conn
        .prepare_cached(APPLY_STATE)?
        .query_row(
            params![
                i64::from(checkpoint.complete),
                status,
                next_step,
                failure_reason,
                now_ms(),
                i64::from(checkpoint.enter_pivot),
                id,
                checkpoint.epoch,
            ],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>("updated_at_ms")?,
                ))
            },
        )
        .optional()?;
    let Some((new_status, cancel_requested, pivot_passed, updated_at_ms)) = row else {
        // Already terminal: applied before (its COMMIT's reply was lost), or
        // another driver ended the saga; or another replica holds it now.
        // Nothing to write.
        let status: String = conn
            .prepare_cached(SAGA_STATUS)?
            .query_row(params![id], |r| r.get(0))?;
        return Ok(Applied::refused(parse_status(&status)?));
    };
    for step in &checkpoint.steps {
        upsert_step(conn, &id, step, checkpoint.epoch)?;
        for attempt in &step.attempt_log {
            conn.prepare_cached(INSERT_ATTEMPT)?.execute(params![
                id,
                step.phase.as_str(),
                step.index,
                i64::from(attempt.attempt),
                attempt.started_at_ms,
                attempt.finished_at_ms,
                attempt.error,
            ])?;
        }
    }
    let pivot_entered = checkpoint.enter_pivot && pivot_passed == 1;
    let completed = checkpoint.complete && new_status == "COMPLETED";
    if checkpoint.announces(completed) {
        for event in &checkpoint.events {
            insert_event(conn, event)?;
        }
    }
    Ok(Applied {
        cancel_requested: cancel_requested != 0,
        pivot_entered,
        completed,
        closed: None,
        fenced: false,
        updated_at_ms,
    })
}

/// See [`super::reopen`]: the same statements, on this connection.
fn reopen(conn: &Connection, action: &Reopen, owner: &str) -> rusqlite::Result<ReopenOutcome> {
    let id = action.saga_id.to_string();
    let seen = conn
        .prepare_cached(ACTION_SEEN)?
        .query_row(params![action.request_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let resting = conn
        .prepare_cached(RESTING)?
        .query_row(params![id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()?
        .map(|(status, next, reason)| {
            Ok::<_, rusqlite::Error>((parse_status(&status)?, next, reason))
        })
        .transpose()?;
    let (next_step, failure_reason) = match plan_reopen(action, seen, resting) {
        Ok(plan) => plan,
        Err(outcome) => return Ok(outcome),
    };
    let now = now_ms();
    // The saga's row first, only while it rests, as on PostgreSQL (where two
    // actions at once both read it resting). Here every write of the log
    // runs on this thread, one at a time: the read above holds.
    let reopened =
        conn.prepare_cached(REOPEN)?
            .execute(params![next_step, owner, failure_reason, now, id])?;
    if reopened != 1 {
        return Err(rusqlite::Error::StatementChangedRows(reopened));
    }
    if let Some(note) = &action.resolved_by_hand {
        conn.prepare_cached(RESOLVE_STEP)?
            .execute(params![note, now, id, next_step + 1])?;
    }
    conn.prepare_cached(RECORD_ACTION)?.execute(params![
        action.request_id,
        id,
        action.action(),
        action.note(),
        now
    ])?;
    Ok(ReopenOutcome::Reopened)
}

/// See [`super::request_cancel`]: the same statements, on this connection.
fn request_cancel(conn: &Connection, saga_id: Uuid) -> rusqlite::Result<CancelOutcome> {
    let id = saga_id.to_string();
    if conn
        .prepare_cached(CANCEL)?
        .execute(params![now_ms(), id])?
        == 1
    {
        return Ok(CancelOutcome::Accepted);
    }
    let row = conn
        .prepare_cached(CANCEL_REFUSED_BECAUSE)?
        .query_row(params![id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?;
    let Some((status, pivot_passed, cancel_requested)) = row else {
        return Ok(CancelOutcome::NotFound);
    };
    Ok(CancelOutcome::refused(
        parse_status(&status)?,
        pivot_passed != 0,
        cancel_requested != 0,
    ))
}

fn parse_status(status: &str) -> rusqlite::Result<SagaStatus> {
    SagaStatus::parse(status).ok_or_else(|| unexpected("saga status", status))
}

/// See [`events::insert`]: the same statements, on this connection.
fn insert_event(conn: &Connection, event: &NewEvent) -> rusqlite::Result<bool> {
    let event_id = event.event_id().to_string();
    let aggregate_id = event.aggregate_id.to_string();
    let taken: Option<(i64, i64)> = conn
        .prepare_cached(events::NEXT_SEQUENCE)?
        .query_row(params![aggregate_id, event_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((sequence, epoch)) = taken else {
        // Written before, or (a bug) no such saga: only the first is fine.
        let written: Option<i64> = conn
            .prepare_cached(events::WRITTEN_BEFORE)?
            .query_row(params![aggregate_id, event_id], |r| r.get(0))
            .optional()?;
        return match written {
            Some(_) => Ok(false),
            None => Err(rusqlite::Error::QueryReturnedNoRows),
        };
    };
    let occurred_at_ms = now_ms();
    let payload = events::Payload::new(event, &event_id, occurred_at_ms);
    conn.prepare_cached(events::INSERT)?.execute(params![
        event_id,
        aggregate_id,
        sequence,
        event.event_type,
        payload.with_sequence(sequence),
        event.traceparent,
        occurred_at_ms,
        epoch,
    ])?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_waits_for_the_disk_unless_durability_is_relaxed() {
        let synchronous = |durability| {
            let dir = tempfile::tempdir().unwrap();
            let conn = Connection::open(dir.path().join("log.db")).unwrap();
            configure(&conn, durability).unwrap();
            conn.query_row("PRAGMA synchronous", [], |row| row.get::<_, i64>(0))
                .unwrap()
        };
        // SQLite's levels: 1 NORMAL, 2 FULL.
        assert_eq!(synchronous(Durability::Full), 2);
        assert_eq!(synchronous(Durability::Relaxed), 1);
    }

    #[test]
    fn the_bundled_sqlite_is_built_without_its_global_locks() {
        // `.cargo/config.toml` passes these to libsqlite3-sys's build. Without
        // them every page fetched and every allocation takes a process-wide
        // mutex (a unified page cache, memory statistics): about a tenth of
        // the log thread's CPU (docs/benchmarks.md). A build that lost the
        // setting (another config, an env override) fails here.
        let conn = Connection::open_in_memory().unwrap();
        let used = |option: &str| {
            conn.query_row("SELECT sqlite_compileoption_used(?1)", [option], |row| {
                row.get::<_, i64>(0)
            })
            .unwrap()
        };
        assert_eq!(used("ENABLE_MEMORY_MANAGEMENT"), 0);
        assert_eq!(used("DEFAULT_MEMSTATUS=0"), 1);
    }

    #[test]
    fn finds_the_file_of_a_sqlite_url_and_none_in_memory() {
        assert_eq!(
            file_of_url("sqlite://data/orders.db?mode=rwc"),
            Some(PathBuf::from("data/orders.db"))
        );
        assert_eq!(
            file_of_url("sqlite:///tmp/x/orders.db"),
            Some(PathBuf::from("/tmp/x/orders.db"))
        );
        assert_eq!(file_of_url("sqlite::memory:"), None);
        assert_eq!(
            file_of_url("sqlite://shared?mode=memory&cache=shared"),
            None
        );
        assert_eq!(file_of_url("postgres://u@h/db"), None);
    }

    #[test]
    fn refuses_a_file_that_is_not_a_migrated_saga_log() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.db");
        let err = SqliteLog::open(&missing, Durability::Full)
            .err()
            .expect("a missing file is refused");
        assert!(
            format!("{err:#}").contains("cannot open the saga log"),
            "{err:#}"
        );
        assert!(
            !missing.exists(),
            "no empty database is created in its place"
        );
        let empty = dir.path().join("empty.db");
        Connection::open(&empty).unwrap();
        let err = SqliteLog::open(&empty, Durability::Full)
            .err()
            .expect("a file without the tables is refused");
        assert!(format!("{err:#}").contains("holds no saga log"), "{err:#}");
    }
}
