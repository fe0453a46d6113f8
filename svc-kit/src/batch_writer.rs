//! A service's hot writes on a SQLite file: one thread with its own
//! connection, and many requests per commit.
//!
//! Through sqlx, every statement is a message to the connection's worker
//! thread and a reply back: two thread wake-ups per statement, six to eight
//! statements per request, and one commit (one fsync) per request. In the
//! profile of a service under load, those wake-ups and context switches were
//! over half of its CPU (docs/benchmarks.md). Here a request is one hand-over
//! to the thread and one back, and the requests waiting together share one
//! transaction, one commit and one fsync (group commit).
//!
//! Each job runs inside its own savepoint, so one request's failure undoes
//! only its own writes. A job's result reaches its caller only after the
//! commit: nothing is acknowledged before it is durable.
//!
//! The sqlx pool stays open on the same file for reads and for the rare
//! writes that are not worth a second implementation (admin calls). Those
//! take the [`WriteGate`] first, as every batch does, so the two connections
//! never wait on SQLite's busy handler (it polls with sleeps, and under load
//! a second writer starved).

use std::{
    cell::RefCell,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot};

use crate::durability::Durability;

/// The most requests one commit carries.
const MAX_BATCH: usize = 256;

/// What a job decided about its own writes.
pub enum Outcome<T> {
    /// Keep them: they commit with the batch.
    Keep(T),
    /// Undo them (back to the job's savepoint); the batch goes on.
    Undo(T),
    /// Undo them, then write what the function writes in their place, in
    /// the job's savepoint still: a refusal stored without the half of an
    /// effect that came before it, with no second savepoint inside the
    /// job's. If the function fails, nothing of the job stays.
    UndoThen(T, Instead),
}

/// What a job writes in place of its own undone writes.
pub type Instead = Box<dyn FnOnce(&Connection) -> rusqlite::Result<()>>;

/// Called after the commit, with its result: sends the job's result.
type Deliver = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Runs the job in the open transaction, or (with `None`) not at all, when
/// the transaction could not begin.
type Job = Box<dyn FnOnce(Option<&Connection>) -> Deliver + Send>;

/// The turn to write to the file, fair (first come, first served) between
/// the batch writer and the pool's connection.
#[derive(Clone, Default)]
pub struct WriteGate(Arc<Mutex<()>>);

impl WriteGate {
    pub async fn enter(&self) -> OwnedMutexGuard<()> {
        self.0.clone().lock_owned().await
    }
}

#[derive(Clone)]
pub struct BatchWriter {
    jobs: mpsc::Sender<Job>,
    gate: WriteGate,
    /// Times the writer found the file locked by another connection and
    /// waited ([`wait_while_busy`]).
    busy_waits: Arc<AtomicU64>,
}

/// How long the writer waits for another connection's lock on the file
/// before its batch fails (SQLite's busy timeout).
const BUSY_TIMEOUT_MS: u32 = 5_000;

thread_local! {
    /// The counter of the writer running on this thread: SQLite's busy
    /// handler is a plain function, called on the thread that met the lock.
    static BUSY_WAITS: RefCell<Option<Arc<AtomicU64>>> = const { RefCell::new(None) };
}

/// SQLite's busy handler for the writer: SQLite's own schedule of sleeps
/// ([`busy_delay_ms`]), each wait counted. Behind the gate the writer never
/// waits: a wait means a connection wrote without it, or still held its
/// lock after giving the gate back.
fn wait_while_busy(attempt: i32) -> bool {
    let Some(delay) = busy_delay_ms(attempt) else {
        return false;
    };
    BUSY_WAITS.with(|waits| {
        if let Some(waits) = waits.borrow().as_ref() {
            waits.fetch_add(1, Ordering::Relaxed);
        }
    });
    thread::sleep(Duration::from_millis(u64::from(delay)));
    true
}

/// The sleep before try `attempt + 1` at a locked file, as SQLite's default
/// busy handler sleeps (1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, then 100
/// ms), or `None` once [`BUSY_TIMEOUT_MS`] have passed in all.
fn busy_delay_ms(attempt: i32) -> Option<u32> {
    const DELAYS_MS: [u32; 12] = [1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100];
    let attempt = usize::try_from(attempt).unwrap_or(0);
    let (delay, prior) = match DELAYS_MS.get(attempt) {
        Some(&delay) => (delay, DELAYS_MS[..attempt].iter().sum::<u32>()),
        None => {
            let past = u32::try_from(attempt - (DELAYS_MS.len() - 1)).unwrap_or(u32::MAX);
            (100, 228u32.saturating_add(past.saturating_mul(100)))
        }
    };
    Some(delay.min(BUSY_TIMEOUT_MS.saturating_sub(prior))).filter(|&delay| delay > 0)
}

impl BatchWriter {
    /// Opens the (existing, migrated) file and starts the writer thread.
    /// Its commits wait for the disk as `durability` says.
    pub fn open(path: &Path, gate: WriteGate, durability: Durability) -> anyhow::Result<Self> {
        // No CREATE flag: a path that is not the pool's file is an error, not
        // a second, empty database.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open the store at {}", path.display()))?;
        // The pool's settings: WAL, each commit on disk before it is
        // acknowledged unless durability is relaxed, foreign keys enforced.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", durability.sqlite_synchronous())?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_handler(Some(wait_while_busy))?;
        // A batch's savepoints need a statement journal: in memory, not a
        // temporary file opened, written and unlinked at each commit.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.set_prepared_statement_cache_capacity(64);
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread_gate = gate.clone();
        let busy_waits = Arc::new(AtomicU64::new(0));
        let thread_waits = busy_waits.clone();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                BUSY_WAITS.with(|waits| *waits.borrow_mut() = Some(thread_waits));
                run(conn, rx, thread_gate)
            })
            .context("cannot start the store's writer thread")?;
        Ok(BatchWriter {
            jobs,
            gate,
            busy_waits,
        })
    }

    /// How many times so far the writer found the file locked by another
    /// connection, and waited.
    pub fn busy_waits(&self) -> u64 {
        self.busy_waits.load(Ordering::Relaxed)
    }

    /// The gate the pool's writers take on this file.
    pub fn gate(&self) -> &WriteGate {
        &self.gate
    }

    /// Runs `job` in the next batch, inside its own savepoint; returns its
    /// result once the batch is committed.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&Connection) -> rusqlite::Result<Outcome<T>> + Send + 'static,
    ) -> Result<T, String> {
        let (reply, done) = oneshot::channel::<Result<T, String>>();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Some(conn) => in_savepoint(conn, job),
                None => Err("the batch did not begin".to_owned()),
            };
            Box::new(move |committed| {
                let _ = reply.send(committed.and(result));
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| "the store's writer thread has stopped".to_owned())?;
        done.await
            .map_err(|_| "the store's writer thread stopped mid-batch".to_owned())?
    }
}

/// Holds the writer's thread with a job that waits until the sender sends
/// (or is dropped): the jobs sent meanwhile share the next batch.
#[cfg(test)]
pub(crate) fn hold_writer(
    writer: &BatchWriter,
) -> (
    mpsc::Sender<()>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (hold, held) = mpsc::channel::<()>();
    let writer = writer.clone();
    let holding = tokio::spawn(async move {
        writer
            .run(move |_| {
                let _ = held.recv();
                Ok(Outcome::Keep(()))
            })
            .await
    });
    (hold, holding)
}

/// A job's answer when it panicked (a bug).
const PANICKED: &str = "the request's job panicked; its writes were undone";

fn in_savepoint<T>(
    conn: &Connection,
    job: impl FnOnce(&Connection) -> rusqlite::Result<Outcome<T>>,
) -> Result<T, String> {
    let undo = |conn: &Connection| {
        execute(conn, "ROLLBACK TO job")?;
        execute(conn, "RELEASE job")
    };
    execute(conn, "SAVEPOINT job")?;
    // A job that panics (a bug) fails alone: its writes are undone, and the
    // thread goes on serving every other request of the store.
    let Ok(ran) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(conn))) else {
        undo(conn)?;
        return Err(PANICKED.into());
    };
    match ran {
        Ok(Outcome::Keep(value)) => execute(conn, "RELEASE job").map(|()| value),
        Ok(Outcome::Undo(value)) => undo(conn).map(|()| value),
        Ok(Outcome::UndoThen(value, instead)) => {
            execute(conn, "ROLLBACK TO job")?;
            // Caught as the job is: a panic here must not end the thread.
            let wrote =
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| instead(conn))) {
                    Ok(wrote) => wrote.map_err(|e| e.to_string()),
                    Err(_) => Err(PANICKED.to_owned()),
                };
            match wrote {
                Ok(()) => execute(conn, "RELEASE job").map(|()| value),
                Err(err) => {
                    undo(conn)?;
                    Err(err)
                }
            }
        }
        Err(err) => {
            undo(conn)?;
            Err(err.to_string())
        }
    }
}

/// One statement of the job's savepoint, prepared once: through
/// `execute_batch`, SQLite parsed its text again at every request.
fn execute(conn: &Connection, sql: &str) -> Result<(), String> {
    conn.prepare_cached(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(drop)
        .map_err(|e| e.to_string())
}

fn run(mut conn: Connection, jobs: mpsc::Receiver<Job>, gate: WriteGate) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = jobs.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let _turn = gate.0.blocking_lock();
        let (deliveries, committed) = commit(&mut conn, &mut batch);
        for deliver in deliveries {
            deliver(committed.clone());
        }
    }
}

/// Runs the batch in one transaction; returns each job's delivery and the
/// commit's result.
fn commit(conn: &mut Connection, batch: &mut Vec<Job>) -> (Vec<Deliver>, Result<(), String>) {
    match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => {
            let mut deliveries = Vec::with_capacity(batch.len());
            for job in batch.drain(..) {
                // SQLite ends the whole transaction on some errors (a full disk,
                // an I/O error). Run nothing more: outside a transaction each
                // job would commit alone while its caller hears of a failure.
                let open = !tx.is_autocommit();
                deliveries.push(job(open.then_some(&*tx)));
            }
            let committed = tx.commit().map_err(|e| e.to_string());
            if let Err(err) = &committed {
                tracing::error!(error = %err, "a batch on the store did not commit");
            }
            (deliveries, committed)
        }
        Err(err) => {
            let err = err.to_string();
            tracing::error!(error = %err, size = batch.len(), "cannot begin a batch on the store");
            (batch.drain(..).map(|job| job(None)).collect(), Err(err))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn file_with_table() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
            .unwrap();
        (dir, path)
    }

    fn rows(path: &Path) -> Vec<(String, i64)> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    fn insert(
        key: &'static str,
        then: fn(()) -> Outcome<()>,
    ) -> impl FnOnce(&Connection) -> rusqlite::Result<Outcome<()>> {
        move |conn| {
            conn.execute("INSERT INTO t (k, v) VALUES (?1, 1)", [key])?;
            Ok(then(()))
        }
    }

    #[tokio::test]
    async fn the_writer_waits_for_the_disk_unless_durability_is_relaxed() {
        let (_dir, path) = file_with_table();
        // SQLite's levels: 1 NORMAL, 2 FULL.
        for (durability, level) in [(Durability::Full, 2), (Durability::Relaxed, 1)] {
            let writer = BatchWriter::open(&path, WriteGate::default(), durability).unwrap();
            let synchronous = writer
                .run(|conn| {
                    let level: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                    Ok(Outcome::Keep(level))
                })
                .await
                .unwrap();
            assert_eq!(synchronous, level, "{durability:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_job_keeps_or_undoes_only_its_own_writes() {
        let (_dir, path) = file_with_table();
        let writer = BatchWriter::open(&path, WriteGate::default(), Durability::Full).unwrap();
        // Sent together, so most land in one batch: an undone job and a failed
        // one must not take their neighbours' writes with them.
        let (kept, undone, failed, also_kept, replaced) = tokio::join!(
            writer.run(insert("a", Outcome::Keep)),
            writer.run(insert("b", Outcome::Undo)),
            writer.run(|conn| {
                conn.execute("INSERT INTO t (k, v) VALUES ('c', 1)", [])?;
                // A duplicate key: the job fails after its first write.
                conn.execute("INSERT INTO t (k, v) VALUES ('c', 2)", [])?;
                Ok(Outcome::Keep(()))
            }),
            writer.run(insert("d", Outcome::Keep)),
            // Its own write undone, another made in its place.
            writer.run(insert("e", |()| Outcome::UndoThen(
                (),
                Box::new(|conn| conn
                    .execute("INSERT INTO t (k, v) VALUES ('f', 2)", [])
                    .map(drop)),
            ))),
        );
        assert!(kept.is_ok() && undone.is_ok() && also_kept.is_ok() && replaced.is_ok());
        // A replacement that fails, then one that panics: neither its own
        // write nor the replacement's stays, and the writer goes on.
        let failed_instead = writer
            .run(insert("g", |()| {
                Outcome::UndoThen(
                    (),
                    Box::new(|conn| {
                        conn.execute("INSERT INTO t (k, v) VALUES ('h', 1)", [])?;
                        conn.execute("INSERT INTO t (k, v) VALUES ('h', 2)", [])
                            .map(drop)
                    }),
                )
            }))
            .await;
        assert!(failed_instead.expect_err("reported").contains("UNIQUE"));
        let panicked_instead = writer
            .run(insert("i", |()| {
                Outcome::UndoThen(
                    (),
                    Box::new(|conn| {
                        conn.execute("INSERT INTO t (k, v) VALUES ('j', 1)", [])?;
                        panic!("a bug in a replacement")
                    }),
                )
            }))
            .await;
        assert!(panicked_instead.expect_err("reported").contains("panicked"));
        let failed = failed.expect_err("a job whose statement fails reports it");
        assert!(failed.contains("UNIQUE"), "{failed}");
        assert_eq!(
            rows(&path),
            vec![("a".into(), 1), ("d".into(), 1), ("f".into(), 2)]
        );
    }

    /// SQLite may end the whole transaction on an error (a full disk, an I/O
    /// error). The jobs after it must not run outside any transaction, each
    /// committing alone while its caller is told the batch failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_job_runs_after_the_transaction_is_gone() {
        let (_dir, path) = file_with_table();
        let writer = BatchWriter::open(&path, WriteGate::default(), Durability::Full).unwrap();
        // Hold the writer's thread so that the next two jobs share a batch.
        let (hold, holding) = hold_writer(&writer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ends_it = tokio::spawn({
            let writer = writer.clone();
            async move {
                writer
                    .run(|conn| {
                        // As SQLite does on SQLITE_FULL or an I/O error.
                        conn.execute_batch("ROLLBACK")?;
                        Ok(Outcome::Keep(()))
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let after = tokio::spawn({
            let writer = writer.clone();
            async move { writer.run(insert("after", Outcome::Keep)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        hold.send(()).unwrap();
        let _ = holding.await.unwrap();
        let _ = ends_it.await.unwrap();
        let after = after.await.unwrap();
        let stored = rows(&path).iter().any(|(k, _)| k == "after");
        assert_eq!(
            after.is_ok(),
            stored,
            "a job's caller is told it failed only if its writes are not stored (told {after:?}, stored: {stored})"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_panics_fails_alone_and_the_writer_goes_on() {
        let (_dir, path) = file_with_table();
        let writer = BatchWriter::open(&path, WriteGate::default(), Durability::Full).unwrap();
        let panicked = writer
            .run(|conn| -> rusqlite::Result<Outcome<()>> {
                conn.execute("INSERT INTO t (k, v) VALUES ('p', 1)", [])?;
                panic!("a bug in a request's effect")
            })
            .await;
        assert!(panicked.unwrap_err().contains("panicked"));
        writer
            .run(insert("after", Outcome::Keep))
            .await
            .expect("the next request is served");
        assert_eq!(rows(&path), vec![("after".into(), 1)]);
    }

    /// The writer waits at a locked file as SQLite's default handler did
    /// with a 5 s timeout: the same sleeps, 5 s in all.
    #[test]
    fn a_locked_file_is_waited_on_for_five_seconds_in_sqlites_steps() {
        let delays: Vec<u32> = (0..).map_while(busy_delay_ms).collect();
        assert_eq!(delays[..12], [1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100]);
        assert_eq!(delays.iter().sum::<u32>(), BUSY_TIMEOUT_MS);
        assert_eq!(busy_delay_ms(i32::MAX), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_gated_writer_on_another_connection_is_not_starved() {
        let (_dir, path) = file_with_table();
        let gate = WriteGate::default();
        let writer = BatchWriter::open(&path, gate.clone(), Durability::Full).unwrap();
        // Keep the batch writer busy while another connection writes through
        // the gate, with no busy wait to rescue it.
        let busy = tokio::spawn({
            let writer = writer.clone();
            async move {
                for i in 0..300 {
                    writer
                        .run(move |conn| {
                            conn.execute(
                                "INSERT INTO t (k, v) VALUES (?1, 1)",
                                [format!("busy-{i:03}")],
                            )?;
                            Ok(Outcome::Keep(()))
                        })
                        .await
                        .unwrap();
                }
            }
        });
        let other = Connection::open(&path).unwrap();
        other.busy_timeout(Duration::ZERO).unwrap();
        for i in 0..20 {
            let _turn = gate.enter().await;
            other
                .execute(
                    "INSERT INTO t (k, v) VALUES (?1, 2)",
                    [format!("gated-{i:02}")],
                )
                .expect("the gate's holder never meets a locked database");
        }
        busy.await.unwrap();
        assert_eq!(rows(&path).len(), 320);
    }
}
