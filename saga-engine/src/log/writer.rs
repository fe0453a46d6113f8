//! The group-commit writer: one task owns the log's writes.
//!
//! Drivers hand it checkpoints, `Engine::start` new sagas, `Engine::cancel`
//! cancellations and the outbox relay what it has published; it
//! commits whatever is waiting as one transaction, so under load many sagas
//! share one commit and one fsync. A caller moves on only after the commit.
//!
//! Where the transaction runs depends on the store:
//! - a SQLite file: on one thread with its own connection ([`super::sqlite`]),
//!   the whole batch in one hand-over. Every write goes through it, so no
//!   other connection ever waits on SQLite's write lock.
//! - PostgreSQL (and the in-memory benchmark store): through sqlx; checkpoints
//!   are group-committed, the other writes run at once on the pool.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use futures::future::BoxFuture;
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection, any::AnyConnectOptions};
use tokio::sync::{mpsc, oneshot, watch};

use uuid::Uuid;

use super::{
    Applied, CancelOutcome, Checkpoint, Durability, MARK_SENT, MOST_ADMITTED_AT_ONCE, NewSaga,
    PRUNE_SENT, Reopen, ReopenOutcome, SagaStatus, ToAdmit, apply,
    crash_recovery::CrashRecoveryGuard,
    insert_saga, insert_sagas_admitted,
    kept::{Kept, is_postgres},
    postgres, reopen, request_cancel,
    sqlite::SqliteLog,
};
use crate::{
    crash_points::{self, point},
    engine::Admission,
    events::{self, NewEvent},
    notifications::{self, Notice},
};

/// The most writes one commit carries.
const MAX_BATCH: usize = 512;

/// The caller's rows that commit with a new saga (e.g. the order and its
/// idempotency key). Written once per kind of store: through sqlx, and on the
/// SQLite log writer's own connection. Either may refuse; then nothing of the
/// saga is written.
///
/// Each method is given `at_ms`, the time the saga is recorded at (its
/// created time), for rows of the caller's that keep one: the two agree.
pub trait Admit: Send + Sync + 'static {
    /// Through sqlx, inside the transaction that records the saga.
    fn admit<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        at_ms: i64,
    ) -> BoxFuture<'c, Result<Admission, sqlx::Error>>;

    /// On a SQLite file, inside the transaction that records the saga.
    fn admit_sqlite(&self, conn: &rusqlite::Connection, at_ms: i64) -> rusqlite::Result<Admission>;

    /// On PostgreSQL, the caller's rows of new sagas as one `INSERT …
    /// SELECT` from `$1`, its only parameter: a JSON array of
    /// [`Admit::insert_row`]s (read, say, by `jsonb_to_recordset($1::jsonb)`).
    /// It returns the `saga_id` of each saga whose rows it wrote
    /// (`RETURNING … AS saga_id`), and nothing for one it refuses (e.g.
    /// `ON CONFLICT DO NOTHING`). Of two rows with one key, the first in the
    /// array must win, as if they came one after the other: rows are given
    /// in the batch's order, which SQL keeps only when told to (`ROWS FROM
    /// (jsonb_to_recordset($1::jsonb) AS (…)) WITH ORDINALITY … ORDER BY`).
    /// It must not read the statement's own tables by the names `admitted`,
    /// `new_sagas`, `new_saga` or `new_events` (see `log::admission_ctes`).
    ///
    /// It goes into the statement that records the sagas, which writes a
    /// saga only if its rows were written: one round trip and one plan for
    /// all of a batch's new sagas, and a refusal writes nothing, so a batch
    /// needs no savepoint for it. Its rows may reference the sagas' own
    /// (constraints are checked at the statement's end). `None` (the
    /// default): [`Admit::admit`] runs after each saga's insert instead.
    fn insert_rows_sql(&self) -> Option<&'static str> {
        None
    }

    /// This saga's row of [`Admit::insert_rows_sql`]'s array, as a JSON
    /// object. Called only when that gives a statement.
    fn insert_row(&self, _at_ms: i64) -> String {
        String::from("{}")
    }
}

/// A new saga, the caller's rows and its first events, written together.
pub(crate) struct Start {
    pub saga: NewSaga,
    pub admit: Box<dyn Admit>,
    pub events: Vec<NewEvent>,
}

/// Every write to the log's tables goes through the writer, so that on a
/// SQLite file no other connection competes for the write lock (SQLite's busy
/// wait polls with sleeps, and under load a second writer starved).
pub(crate) enum Write {
    Checkpoint(Checkpoint),
    Start(Start),
    Cancel(Uuid),
    /// An operator's action, and the replica that will drive the saga.
    Reopen(Reopen, String),
    EventsSent {
        ids: Vec<i64>,
        at_ms: i64,
    },
    PruneSent {
        before_ms: i64,
    },
}

pub(crate) enum Written {
    Checkpoint(Applied),
    Start(Admission),
    Cancel(CancelOutcome),
    Reopen(ReopenOutcome),
    Rows(u64),
}

type Reply = oneshot::Sender<Result<Written, String>>;

enum Backend {
    /// With the replica's incarnation when its commits notify the others,
    /// and the connection kept from one commit to the next.
    Pool {
        pool: AnyPool,
        notify_as: Option<Uuid>,
        kept: Kept,
        /// On PostgreSQL with relaxed commits: halts the writer when the
        /// server recovered from a crash (see [`CrashRecoveryGuard`]).
        crash_guard: Option<Arc<CrashRecoveryGuard>>,
    },
    SqliteFile(SqliteLog),
}

#[derive(Clone)]
pub struct LogWriter {
    queue: mpsc::Sender<(Write, Reply)>,
    /// Through sqlx, checkpoints and starts are queued for group commit; the
    /// other writes (cancels, operator actions, the relay's) run at once in
    /// their own transactions, side by side on the pool's connections.
    /// Starts joined the queue once a batch of checkpoints became one
    /// statement on PostgreSQL: in a transaction of its own, each start cost
    /// a commit and three more round trips, and the orchestrator's database
    /// 25-35% more CPU per saga; before, when a batch was slow, queued starts
    /// had cost 17% of throughput (docs/benchmarks.md).
    direct: Option<AnyPool>,
    /// In replica mode, the incarnation that signs the notices each commit
    /// sends to the other replicas (see [`crate::notifications`]).
    notify_as: Option<Uuid>,
    /// Batches that failed and were committed one write at a time.
    split_batches: Arc<AtomicU64>,
    /// Why the writer stopped writing for good, once it has.
    halted: Arc<watch::Sender<Option<String>>>,
    /// With relaxed commits on PostgreSQL: the writer's crash guard and its
    /// pool, for [`LogWriter::arm`].
    armed: Option<(Arc<CrashRecoveryGuard>, AnyPool)>,
}

impl LogWriter {
    /// On a SQLite file the writer opens its own connection to the pool's
    /// file (which must exist and be migrated). With `notify_as`, every
    /// commit through the pool tells the other replicas what changed. The
    /// writer's commits wait for the disk as `durability` says; the pool's
    /// other users commit as the pool was set up.
    pub fn spawn(
        pool: AnyPool,
        notify_as: Option<Uuid>,
        durability: Durability,
    ) -> anyhow::Result<Self> {
        let halted = Arc::new(watch::channel(None).0);
        let mut armed = None;
        let (backend, direct) = match SqliteLog::file_of(&pool) {
            Some(path) => (
                Backend::SqliteFile(SqliteLog::open(&path, durability)?),
                None,
            ),
            None => {
                let postgres = is_postgres(&pool);
                let own = match postgres {
                    true => planning_by_key(&pool, durability)?,
                    false => pool.clone(),
                };
                let crash_guard = (postgres && durability == Durability::Relaxed)
                    .then(|| Arc::new(CrashRecoveryGuard::new(halted.clone())));
                armed = crash_guard.clone().map(|guard| (guard, own.clone()));
                (
                    Backend::Pool {
                        kept: Kept::new(own.clone(), 1),
                        pool: own,
                        notify_as,
                        crash_guard,
                    },
                    Some(pool),
                )
            }
        };
        let (queue, rx) = mpsc::channel(4 * MAX_BATCH);
        let split_batches = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_batches(backend, rx, split_batches.clone()));
        Ok(LogWriter {
            queue,
            direct,
            notify_as,
            split_batches,
            halted,
            armed,
        })
    }

    /// With relaxed commits on PostgreSQL, leaves the writer's mark now (see
    /// [`CrashRecoveryGuard`]), before anything is read from the log: a
    /// state read before a crash recovery may hold relaxed commits the
    /// recovery takes back, and only a mark left before the crash tells.
    /// Does nothing otherwise.
    pub async fn arm(&self) -> Result<(), sqlx::Error> {
        let Some((guard, pool)) = &self.armed else {
            return Ok(());
        };
        let mut conn = pool.acquire().await?;
        guard.check(&mut conn).await
    }

    /// Whether the writer has stopped writing for good (see [`LogWriter::halted`]).
    pub fn is_halted(&self) -> bool {
        self.halted.borrow().is_some()
    }

    /// Resolves, with the reason, once the writer has stopped writing for
    /// good: relaxed commits on a PostgreSQL server that recovered from a
    /// crash (see [`CrashRecoveryGuard`]). Never resolves otherwise.
    pub async fn halted(&self) -> String {
        once_set(self.halted.subscribe()).await
    }

    /// How many batches failed as a whole and were committed one write at a
    /// time since the writer started. Each is also logged as a warning: a
    /// batch fails when one of its writes does, or (a bug) when the batch's
    /// own statements do, which the one-by-one retry would otherwise hide.
    pub fn split_batches(&self) -> u64 {
        self.split_batches.load(Ordering::Relaxed)
    }

    /// Returns once the checkpoint is committed.
    pub async fn commit(&self, checkpoint: Checkpoint) -> Result<Applied, String> {
        match self.write(Write::Checkpoint(checkpoint)).await? {
            Written::Checkpoint(applied) => Ok(applied),
            _ => unreachable!("a checkpoint is answered as a checkpoint"),
        }
    }

    /// Returns once the new saga is committed, or refused by its `admit`.
    pub(crate) async fn start(&self, start: Start) -> Result<Admission, String> {
        match self.write(Write::Start(start)).await? {
            Written::Start(admission) => Ok(admission),
            _ => unreachable!("a start is answered as a start"),
        }
    }

    /// Records a cancellation request, if the saga can still be cancelled.
    pub(crate) async fn cancel(&self, saga_id: Uuid) -> Result<CancelOutcome, String> {
        match self.write(Write::Cancel(saga_id)).await? {
            Written::Cancel(outcome) => Ok(outcome),
            _ => unreachable!("a cancel is answered as a cancel"),
        }
    }

    /// Carries out an operator's action on a saga that rests NEEDS_ATTENTION,
    /// claiming it for `owner`.
    pub(crate) async fn reopen(
        &self,
        action: Reopen,
        owner: String,
    ) -> Result<ReopenOutcome, String> {
        match self.write(Write::Reopen(action, owner)).await? {
            Written::Reopen(outcome) => Ok(outcome),
            _ => unreachable!("a reopen is answered as a reopen"),
        }
    }

    /// Marks outbox events as published.
    pub async fn events_sent(&self, ids: Vec<i64>, at_ms: i64) -> Result<(), String> {
        self.write(Write::EventsSent { ids, at_ms }).await.map(drop)
    }

    /// Deletes the events published before `before_ms`; returns how many.
    pub async fn prune_sent_events(&self, before_ms: i64) -> Result<u64, String> {
        match self.write(Write::PruneSent { before_ms }).await? {
            Written::Rows(rows) => Ok(rows),
            _ => unreachable!("a prune is answered with a row count"),
        }
    }

    async fn write(&self, write: Write) -> Result<Written, String> {
        if let Some(pool) = &self.direct
            && !matches!(write, Write::Checkpoint(_) | Write::Start(_))
        {
            // In a transaction of its own, on a task of its own, so that a
            // caller that is dropped (a CancelOrder whose client left) does
            // not drop the transaction half-way: sqlx would hand a connection
            // whose BEGIN was in flight back to the pool still inside the
            // transaction.
            let pool = pool.clone();
            let notify_as = self.notify_as;
            let written = tokio::spawn(async move {
                commit_on_pool(&pool, std::slice::from_ref(&write), notify_as).await
            });
            let mut written = written
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            return Ok(written.remove(0));
        }
        let (reply, done) = oneshot::channel();
        self.queue
            .send((write, reply))
            .await
            .map_err(|_| "the log writer has stopped".to_owned())?;
        done.await
            .map_err(|_| "the log writer dropped the write".to_owned())?
    }
}

/// The writer's own connections on PostgreSQL, made as the pool's are (its
/// URL, its hooks) but planning every statement by key: sequential and
/// bitmap scans off for the session.
///
/// Why: a prepared statement keeps the plan it was given after its first
/// few runs until its tables are next analyzed, and on a new database that
/// plan was made while the tables were nearly empty. Measured so: the check
/// for events already written read the whole outbox at every batch; a
/// batch statement found its sagas by a bitmap scan of the partial index
/// of open sagas, whose entries stay until vacuum (130-160 of them read per
/// saga at C=64); written so that the partial index could not serve it, it
/// scanned `sagas` whole instead. On these connections only the keys'
/// indexes are left to the planner, and a batch that commits as its one
/// statement (no transaction to `SET LOCAL` in) plans by key too. The
/// pool's other users plan as they will.
///
/// With [`Durability::Relaxed`], the session's commits do not wait for the
/// WAL's flush (`synchronous_commit=off`). With `Full` the server's own
/// setting stands: `on` by default, and an operator's `remote_apply` for a
/// synchronous standby is not weakened.
fn planning_by_key(pool: &AnyPool, durability: Durability) -> anyhow::Result<AnyPool> {
    let mut url = pool.connect_options().database_url.clone();
    url.query_pairs_mut()
        .append_pair("options[enable_seqscan]", "off")
        .append_pair("options[enable_bitmapscan]", "off");
    if let Some(setting) = durability.postgres_synchronous_commit() {
        url.query_pairs_mut()
            .append_pair("options[synchronous_commit]", setting);
    }
    let options = AnyConnectOptions::from_url(&url)?;
    // One in use at a time, one kept (`Kept` keeps at most a quarter), and
    // room to replace a connection the server closed.
    Ok(pool
        .options()
        .clone()
        .min_connections(0)
        .max_connections(4)
        .connect_lazy_with(options))
}

/// The reason `rx` is set to, once it is; never resolves if its sender goes
/// without setting one.
pub(crate) async fn once_set(mut rx: watch::Receiver<Option<String>>) -> String {
    // The borrowed value is let go before the wait below.
    let reason = match rx.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone(),
        Err(_) => None,
    };
    match reason {
        Some(reason) => reason,
        None => std::future::pending().await,
    }
}

async fn write_batches(
    backend: Backend,
    mut rx: mpsc::Receiver<(Write, Reply)>,
    split_batches: Arc<AtomicU64>,
) {
    let mut writes = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while let Some((first, reply)) = rx.recv().await {
        writes.push(first);
        replies.push(reply);
        while writes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((next, reply)) => {
                    writes.push(next);
                    replies.push(reply);
                }
                Err(_) => break,
            }
        }
        // Only checkpoints count here: the crash test of a lost reply means
        // a checkpoint applied twice, not a start.
        let has_events = writes
            .iter()
            .any(|w| matches!(w, Write::Checkpoint(c) if !c.events.is_empty()));
        let result;
        (writes, result) = backend.commit(writes).await;
        match result {
            Ok(results) => {
                writes.clear();
                let lost = crash_points::reach(point::AFTER_LOG_COMMIT).await
                    | (has_events
                        && crash_points::reach(point::AFTER_LOG_COMMIT_WITH_EVENTS).await);
                if lost {
                    // As if the reply to COMMIT was lost: durable, but reported failed.
                    for reply in replies.drain(..) {
                        let _ = reply.send(Err("the reply to COMMIT was lost".into()));
                    }
                    continue;
                }
                for (reply, written) in replies.drain(..).zip(results) {
                    let _ = reply.send(Ok(written));
                }
            }
            // One bad write must not fail its neighbours: retry each alone
            // (not once the writer halted: each would be refused as well).
            Err(err) if writes.len() > 1 && !backend.halted() => {
                tracing::warn!(error = %err, size = writes.len(), "batched log commit failed; committing one by one");
                split_batches.fetch_add(1, Ordering::Relaxed);
                for (write, reply) in writes.drain(..).zip(replies.drain(..)) {
                    let (_, result) = backend.commit(vec![write]).await;
                    let _ = reply.send(result.map(|mut r| r.remove(0)));
                }
            }
            Err(err) => {
                writes.clear();
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

impl Backend {
    /// Whether the writer refuses every write for good (see
    /// [`CrashRecoveryGuard`]).
    fn halted(&self) -> bool {
        matches!(self, Backend::Pool { crash_guard: Some(guard), .. } if guard.halted().is_some())
    }

    /// Commits `writes` as one transaction; hands them back for a retry.
    async fn commit(&self, writes: Vec<Write>) -> (Vec<Write>, Result<Vec<Written>, String>) {
        match self {
            Backend::SqliteFile(log) => log.commit(writes).await,
            Backend::Pool {
                pool,
                notify_as,
                kept,
                crash_guard,
            } => {
                if let Some(reason) = crash_guard.as_ref().and_then(|g| g.halted()) {
                    return (writes, Err(reason));
                }
                let result = commit_kept(pool, kept, crash_guard.as_ref(), &writes, *notify_as)
                    .await
                    .map_err(|e| {
                        crash_guard
                            .as_ref()
                            .and_then(|g| g.halted())
                            .unwrap_or_else(|| e.to_string())
                    });
                (writes, result)
            }
        }
    }
}

/// [`commit_on`] on the writer's kept connection (see [`Kept`]). Made
/// again on another connection only if it failed before anything that can
/// write was sent (at its `BEGIN`): a statement that went through may have
/// committed before its connection was lost (a lone write's one statement,
/// a `COMMIT`), and a write made again after it did could be answered
/// otherwise (a new saga refused by its own row). Such a failure goes to
/// the writes' callers, as any commit of unknown outcome does.
async fn commit_kept(
    pool: &AnyPool,
    kept: &Kept,
    crash_guard: Option<&Arc<CrashRecoveryGuard>>,
    writes: &[Write],
    notify_as: Option<Uuid>,
) -> Result<Vec<Written>, sqlx::Error> {
    let postgres = is_postgres(pool);
    let mut taken = kept.take().await?;
    // A connection not kept may be new: the server may have recovered
    // from a crash meanwhile.
    if let Some(guard) = crash_guard
        && !taken.kept
        && let Err(err) = guard.check(&mut taken.conn).await
    {
        taken.conn.close_on_drop();
        return Err(err);
    }
    let mut sent = false;
    let mut result = commit_on(&mut taken.conn, postgres, writes, notify_as, &mut sent).await;
    if !sent && kept.again(&mut taken, &result).await? {
        if let Some(guard) = crash_guard
            && let Err(err) = guard.check(&mut taken.conn).await
        {
            taken.conn.close_on_drop();
            return Err(err);
        }
        result = commit_on(&mut taken.conn, postgres, writes, notify_as, &mut sent).await;
    }
    kept.give_back(taken, result.is_ok());
    result
}

/// [`commit_on`] on a connection of the pool's.
async fn commit_on_pool(
    pool: &AnyPool,
    writes: &[Write],
    notify_as: Option<Uuid>,
) -> Result<Vec<Written>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    commit_on(&mut conn, is_postgres(pool), writes, notify_as, &mut false).await
}

/// On PostgreSQL, a batch of checkpoints (each saga once) is applied in one
/// statement, and sent events are marked in one. `sent` is set once
/// anything that can write was sent.
async fn commit_on(
    conn: &mut AnyConnection,
    postgres: bool,
    writes: &[Write],
    notify_as: Option<Uuid>,
    sent: &mut bool,
) -> Result<Vec<Written>, sqlx::Error> {
    // A write alone that is one statement commits as one, with no
    // transaction around it: `BEGIN`, `pg_notify` and `COMMIT` were three
    // round trips more on the path of a saga that runs alone.
    match writes {
        [Write::Checkpoint(checkpoint)] if postgres && postgres::fits_alone(checkpoint) => {
            *sent = true;
            let applied = postgres::apply_alone(conn, checkpoint, notify_as).await?;
            return Ok(vec![Written::Checkpoint(applied)]);
        }
        [Write::Start(start)] if events_in_admission(start, postgres) => {
            *sent = true;
            let admission = admit_start(conn, start, postgres, notify_as).await?;
            return Ok(vec![Written::Start(admission)]);
        }
        _ => {}
    }
    // So does a batch made only of checkpoints, on PostgreSQL: one
    // statement that commits alone, its notices in it.
    if postgres
        && let Some(checkpoints) = only_checkpoints(writes)
        && postgres::fits_batch_alone(checkpoints.iter().copied())
    {
        *sent = true;
        let applied = postgres::apply_batch_alone(conn, &checkpoints, notify_as).await?;
        return Ok(applied.into_iter().map(Written::Checkpoint).collect());
    }
    // And a batch of checkpoints and new sagas (the common batch under
    // load): the new sagas are admitted in the checkpoints' statement.
    if postgres
        && let Some(MixedBatch {
            checkpoints,
            starts,
            rows_sql,
        }) = checkpoints_and_admissions(writes)
    {
        *sent = true;
        let to_admit: Vec<ToAdmit<'_>> = starts
            .iter()
            .map(|(_, start)| ToAdmit {
                saga: &start.saga,
                events: &start.events,
                admit: &*start.admit,
            })
            .collect();
        let only: Vec<&Checkpoint> = checkpoints.iter().map(|(_, c)| *c).collect();
        let (applied, admitted) =
            postgres::apply_batch_admitting(conn, &only, rows_sql, &to_admit, notify_as).await?;
        let mut results: Vec<Option<Written>> = writes.iter().map(|_| None).collect();
        for ((i, _), applied) in checkpoints.iter().zip(applied) {
            results[*i] = Some(Written::Checkpoint(applied));
        }
        for ((i, _), admission) in starts.iter().zip(admitted) {
            results[*i] = Some(Written::Start(admission));
        }
        return Ok(results
            .into_iter()
            .map(|written| written.expect("every write is a checkpoint or a start"))
            .collect());
    }
    let mut tx = conn.begin().await?;
    *sent = true;
    let alone = writes.len() == 1;
    let mut batched: Vec<Option<Written>> = writes.iter().map(|_| None).collect();
    let checkpoints: Vec<(usize, &Checkpoint)> = writes
        .iter()
        .enumerate()
        .filter_map(|(i, write)| match write {
            Write::Checkpoint(checkpoint) => Some((i, checkpoint)),
            _ => None,
        })
        .collect();
    // On PostgreSQL, the events of the admitted starts that could not write
    // them with their rows are written at the end of a batch, all in one
    // statement. (A batch of checkpoints writes its own.)
    let mut announced: Vec<&NewEvent> = Vec::new();
    // A checkpoint in a batch with other writes (or one alone with retried
    // attempts) goes statement by statement: in a transaction the batch
    // statement costs more than it saves for one.
    if postgres
        && checkpoints.len() > 1
        && postgres::fits_batch(checkpoints.iter().map(|(_, c)| *c))
    {
        let applied = postgres::apply_batch(
            &mut tx,
            &checkpoints.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        )
        .await?;
        for ((i, _), applied) in checkpoints.iter().zip(applied) {
            batched[*i] = Some(Written::Checkpoint(applied));
        }
    }
    if postgres && !alone {
        admit_together(&mut tx, writes, &mut batched).await?;
    }
    let mut results = Vec::with_capacity(writes.len());
    let mut savepoint = Savepoint::None;
    for (write, batched) in writes.iter().zip(batched) {
        if let Some(written) = batched {
            results.push(written);
            continue;
        }
        results.push(match write {
            Write::Checkpoint(checkpoint) => Written::Checkpoint(apply(&mut tx, checkpoint).await?),
            Write::Start(start) => {
                let admission = match alone {
                    true => admit_start(&mut tx, start, postgres, None).await?,
                    false => start_in_batch(&mut tx, start, postgres, &mut savepoint).await?,
                };
                match admission {
                    Admission::Admit if events_in_admission(start, postgres) => {}
                    Admission::Admit if postgres && !alone => announced.extend(&start.events),
                    Admission::Admit => {
                        for event in &start.events {
                            events::insert(&mut tx, event).await?;
                        }
                    }
                    Admission::Refuse => {}
                }
                Written::Start(admission)
            }
            Write::Cancel(saga_id) => Written::Cancel(request_cancel(&mut tx, *saga_id).await?),
            Write::Reopen(action, owner) => Written::Reopen(reopen(&mut tx, action, owner).await?),
            Write::EventsSent { ids, at_ms } if postgres => {
                postgres::mark_sent(&mut tx, ids, *at_ms).await?;
                Written::Rows(ids.len() as u64)
            }
            Write::EventsSent { ids, at_ms } => {
                for id in ids {
                    sqlx::query(MARK_SENT)
                        .bind(at_ms)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                Written::Rows(ids.len() as u64)
            }
            Write::PruneSent { before_ms } => Written::Rows(
                sqlx::query(PRUNE_SENT)
                    .bind(before_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
            ),
        });
    }
    if alone && matches!(results[0], Written::Start(Admission::Refuse)) {
        tx.rollback().await?;
        return Ok(results);
    }
    events::insert_all_postgres(&mut tx, &announced).await?;
    if let Some(sender) = notify_as {
        notifications::notify(&mut tx, sender, &notices(writes, &results)).await?;
    }
    tx.commit().await?;
    Ok(results)
}

/// On PostgreSQL, the new sagas of a batch that each admit in one statement
/// (see [`events_in_admission`]) are admitted together, up to
/// [`MOST_ADMITTED_AT_ONCE`] per statement: one round trip for all of them.
/// Their answers go into `batched`.
async fn admit_together(
    conn: &mut AnyConnection,
    writes: &[Write],
    batched: &mut [Option<Written>],
) -> Result<(), sqlx::Error> {
    let mut by_statement: Vec<(&'static str, Vec<usize>)> = vec![];
    for (i, write) in writes.iter().enumerate() {
        let Write::Start(start) = write else {
            continue;
        };
        let Some(sql) = start.admit.insert_rows_sql() else {
            continue;
        };
        if !events_in_admission(start, true) {
            continue;
        }
        match by_statement.iter_mut().find(|(other, _)| *other == sql) {
            Some((_, same)) => same.push(i),
            None => by_statement.push((sql, vec![i])),
        }
    }
    for (sql, starts) in by_statement {
        for chunk in starts.chunks(MOST_ADMITTED_AT_ONCE) {
            let sagas: Vec<ToAdmit<'_>> = chunk
                .iter()
                .map(|&i| match &writes[i] {
                    Write::Start(start) => ToAdmit {
                        saga: &start.saga,
                        events: &start.events,
                        admit: &*start.admit,
                    },
                    _ => unreachable!("only starts were chosen"),
                })
                .collect();
            let admissions = insert_sagas_admitted(conn, sql, &sagas, None).await?;
            for (&i, admission) in chunk.iter().zip(admissions) {
                batched[i] = Some(Written::Start(admission));
            }
        }
    }
    Ok(())
}

/// On PostgreSQL, the checkpoints (none or more) and the new sagas (one or
/// more) of a batch that holds nothing else, each with its place in the
/// batch, and their callers' one statement: if the checkpoints
/// [`postgres::fits_batch_alone`], and each
/// new saga admits in one statement ([`events_in_admission`]) through the
/// same caller's statement, at most [`MOST_ADMITTED_AT_ONCE`] of them.
fn checkpoints_and_admissions(writes: &[Write]) -> Option<MixedBatch<'_>> {
    let mut checkpoints = vec![];
    let mut starts = vec![];
    let mut rows_sql = None;
    for (i, write) in writes.iter().enumerate() {
        match write {
            Write::Checkpoint(checkpoint) => checkpoints.push((i, checkpoint)),
            Write::Start(start) if events_in_admission(start, true) => {
                let sql = start.admit.insert_rows_sql()?;
                if *rows_sql.get_or_insert(sql) != sql {
                    return None;
                }
                starts.push((i, start));
            }
            _ => return None,
        }
    }
    let fits = !starts.is_empty()
        && starts.len() <= MOST_ADMITTED_AT_ONCE
        && postgres::fits_batch_alone(checkpoints.iter().map(|(_, c)| *c));
    Some(MixedBatch {
        checkpoints,
        starts,
        rows_sql: rows_sql?,
    })
    .filter(|_| fits)
}

/// A batch of checkpoints and new sagas (see [`checkpoints_and_admissions`]).
struct MixedBatch<'a> {
    checkpoints: Vec<(usize, &'a Checkpoint)>,
    starts: Vec<(usize, &'a Start)>,
    rows_sql: &'static str,
}

/// The checkpoints, if `writes` holds nothing else.
fn only_checkpoints(writes: &[Write]) -> Option<Vec<&Checkpoint>> {
    writes
        .iter()
        .map(|write| match write {
            Write::Checkpoint(checkpoint) => Some(checkpoint),
            _ => None,
        })
        .collect()
}

/// What the other replicas must hear of: each saga a write changed.
fn notices(writes: &[Write], results: &[Written]) -> Vec<Notice> {
    writes
        .iter()
        .zip(results)
        .filter_map(|(write, written)| match (write, written) {
            (Write::Checkpoint(checkpoint), Written::Checkpoint(applied))
                if applied.closed.is_none() && !applied.fenced =>
            {
                Some(Notice {
                    saga_id: checkpoint.saga_id,
                    status: checkpoint.status_after(applied),
                    cancel: false,
                })
            }
            (Write::Start(start), Written::Start(Admission::Admit)) => Some(Notice {
                saga_id: start.saga.saga_id,
                status: Some(SagaStatus::Running),
                cancel: false,
            }),
            (Write::Reopen(action, _), Written::Reopen(ReopenOutcome::Reopened)) => Some(Notice {
                saga_id: action.saga_id,
                status: Some(SagaStatus::Compensating),
                cancel: false,
            }),
            (Write::Cancel(saga_id), Written::Cancel(CancelOutcome::Accepted)) => Some(Notice {
                saga_id: *saga_id,
                status: None,
                cancel: true,
            }),
            _ => None,
        })
        .collect()
}

/// Whether a start's savepoint is left in the batch's transaction.
#[derive(Clone, Copy, PartialEq)]
enum Savepoint {
    None,
    Left,
}

/// A new saga and the caller's rows in a batch: a savepoint takes back this
/// saga's rows, not its neighbours', if the caller refuses. (Alone in its
/// transaction, a refusal rolls the whole transaction back instead; see
/// [`commit_on`].) The savepoint is not released after a start: the
/// next start releases it in the same round trip as it takes its own, and
/// `COMMIT` releases the last. A round trip fewer per saga.
async fn start_in_batch(
    conn: &mut AnyConnection,
    start: &Start,
    postgres: bool,
    savepoint: &mut Savepoint,
) -> Result<Admission, sqlx::Error> {
    if postgres && start.admit.insert_rows_sql().is_some() {
        // One statement that writes all or nothing: no savepoint needed.
        return admit_start(conn, start, postgres, None).await;
    }
    let sql = match savepoint {
        Savepoint::Left => "RELEASE SAVEPOINT start; SAVEPOINT start",
        Savepoint::None => "SAVEPOINT start",
    };
    sqlx::raw_sql(sql).execute(&mut *conn).await?;
    *savepoint = Savepoint::Left;
    let admission = admit_start(conn, start, postgres, None).await?;
    if admission == Admission::Refuse {
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT start")
            .execute(&mut *conn)
            .await?;
    }
    Ok(admission)
}

/// Whether the statement that admits `start` writes its events too: on
/// PostgreSQL, when the caller gives its rows as one insert and the events
/// are all the new saga's, each once (numbered from 1: nothing of a new
/// saga was written before, so the statement looks nothing up).
fn events_in_admission(start: &Start, postgres: bool) -> bool {
    let mut keys = std::collections::HashSet::new();
    postgres
        && start.admit.insert_rows_sql().is_some()
        && start
            .events
            .iter()
            .all(|e| e.aggregate_id == start.saga.saga_id && keys.insert(e.key.as_str()))
}

/// The new saga's rows and the caller's; its events are the caller's to
/// write once admitted, unless [`events_in_admission`]. On PostgreSQL, in
/// one statement when the caller can give its rows as one insert
/// ([`Admit::insert_rows_sql`]).
///
/// `notify_as` is for a start that commits alone as its one statement: the
/// statement tells the other replicas too.
async fn admit_start(
    conn: &mut AnyConnection,
    start: &Start,
    postgres: bool,
    notify_as: Option<Uuid>,
) -> Result<Admission, sqlx::Error> {
    if postgres && let Some(rows_sql) = start.admit.insert_rows_sql() {
        let events = match events_in_admission(start, postgres) {
            true => &start.events[..],
            false => &[],
        };
        let one = ToAdmit {
            saga: &start.saga,
            events,
            admit: &*start.admit,
        };
        let admitted = insert_sagas_admitted(conn, rows_sql, &[one], notify_as).await?;
        return Ok(admitted[0]);
    }
    insert_saga(conn, &start.saga).await?;
    start.admit.admit(conn, start.saga.at_ms).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::any::AnyPoolOptions;

    use super::*;
    use crate::log::{SagaState, StepRecord, StepStatus};

    /// The writer's own sessions on PostgreSQL: commits that skip the WAL's
    /// flush only when durability is relaxed, the server's setting otherwise.
    #[tokio::test]
    async fn the_writers_sessions_skip_the_flush_only_when_durability_is_relaxed() {
        sqlx::any::install_default_drivers();
        let url = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable: {e}"));
        let server_default: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&pool)
            .await
            .unwrap();
        for (durability, expected) in [
            (Durability::Full, server_default.as_str()),
            (Durability::Relaxed, "off"),
        ] {
            let own = planning_by_key(&pool, durability).unwrap();
            let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
                .fetch_one(&own)
                .await
                .unwrap();
            assert_eq!(setting, expected, "{durability:?}");
        }
    }

    /// Writes its key's row in the batch's statement, refusing a key taken.
    struct Keyed(&'static str, Uuid);

    impl Admit for Keyed {
        fn admit<'c>(
            &'c self,
            _: &'c mut AnyConnection,
            _: i64,
        ) -> BoxFuture<'c, Result<Admission, sqlx::Error>> {
            unreachable!("admitted in the statement that records the saga")
        }

        fn admit_sqlite(&self, _: &rusqlite::Connection, _: i64) -> rusqlite::Result<Admission> {
            unreachable!("PostgreSQL only")
        }

        fn insert_rows_sql(&self) -> Option<&'static str> {
            Some(
                "INSERT INTO callers (key, saga_id) \
                 SELECT r.key, r.saga_id FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (key text, saga_id text)) \
                 WITH ORDINALITY AS r(key, saga_id, n) ORDER BY r.n \
                 ON CONFLICT (key) DO NOTHING RETURNING saga_id",
            )
        }

        fn insert_row(&self, _: i64) -> String {
            serde_json::json!({ "key": self.0, "saga_id": self.1.to_string() }).to_string()
        }
    }

    fn start(id: Uuid, key: &'static str) -> Write {
        Write::Start(Start {
            saga: NewSaga {
                saga_id: id,
                kind: "test",
                data_json: "{}".into(),
                trace_context: String::new(),
                starts_at_pivot: false,
                owner: "me".into(),
                at_ms: 1,
            },
            admit: Box::new(Keyed(key, id)),
            events: vec![NewEvent {
                aggregate_id: id,
                key: "started".into(),
                event_type: "test.started".into(),
                data: serde_json::Map::new(),
                traceparent: String::new(),
            }],
        })
    }

    /// On PostgreSQL a batch of checkpoints and new sagas commits as one
    /// statement: a new saga is written, with its first event, only if its
    /// caller's row was (of two with one key, the first), the checkpoint
    /// moves its saga, and the other replicas hear of both in the same
    /// commit.
    #[tokio::test]
    async fn a_batch_of_checkpoints_and_new_sagas_commits_as_one_statement() {
        let db = Database::fresh().await;
        let (pool, url) = (db.pool.clone(), db.url.clone());
        let mut conn = pool.acquire().await.unwrap();
        let running = Uuid::now_v7();
        let first = commit_on(&mut conn, true, &[start(running, "k0")], None, &mut false).await;
        assert!(matches!(
            first.unwrap()[..],
            [Written::Start(Admission::Admit)]
        ));

        let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
        listener.listen(notifications::CHANGES).await.unwrap();
        let sender = Uuid::now_v7();
        let (admitted, twin, refused) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let step = StepRecord {
            phase: crate::Phase::Forward,
            index: 0,
            name: "a",
            status: StepStatus::Succeeded,
            attempts: 1,
            last_error: String::new(),
            output: "out".into(),
            started_at_ms: Some(1),
            finished_at_ms: Some(2),
            attempt_log: vec![],
        };
        let state = SagaState {
            status: SagaStatus::Running,
            next_step: 1,
            failure_reason: String::new(),
        };
        let writes = [
            start(admitted, "k1"),
            Write::Checkpoint(Checkpoint::new(running, 1, vec![step], Some(state), vec![])),
            start(twin, "k1"),
            start(refused, "taken"),
        ];
        let written = commit_on(&mut conn, true, &writes, Some(sender), &mut false)
            .await
            .unwrap();
        assert!(
            matches!(
                &written[..],
                [
                    Written::Start(Admission::Admit),
                    Written::Checkpoint(Applied {
                        closed: None,
                        fenced: false,
                        ..
                    }),
                    Written::Start(Admission::Refuse),
                    Written::Start(Admission::Refuse),
                ]
            ),
            "{:?}",
            written
                .iter()
                .map(|w| matches!(w, Written::Start(Admission::Admit)))
                .collect::<Vec<_>>()
        );
        let one_statement: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_prepared_statements \
             WHERE statement LIKE '%UPDATE sagas s SET%' AND statement LIKE '%INSERT INTO callers%' \
               AND statement NOT LIKE '%pg_prepared_statements%'",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(one_statement, 1, "the batch went statement by statement");

        let sagas: Vec<(String, i64)> =
            sqlx::query_as("SELECT saga_id, next_step FROM sagas ORDER BY saga_id")
                .fetch_all(&pool)
                .await
                .unwrap();
        let mut expected = vec![(running.to_string(), 1), (admitted.to_string(), 0)];
        expected.sort();
        assert_eq!(sagas, expected);
        let events: Vec<String> = sqlx::query_scalar(
            "SELECT aggregate_id FROM outbox WHERE sequence = 1 ORDER BY aggregate_id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut expected: Vec<String> = vec![running.to_string(), admitted.to_string()];
        expected.sort();
        assert_eq!(events, expected, "each admitted saga's first event");
        let owner: String = sqlx::query_scalar("SELECT saga_id FROM callers WHERE key = 'k1'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(owner, admitted.to_string());

        let notice = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("no notice")
            .unwrap();
        let (from, notices) = notifications::decode(notice.payload()).unwrap();
        assert_eq!(from, sender);
        let mut told: Vec<(Uuid, Option<SagaStatus>)> =
            notices.iter().map(|n| (n.saga_id, n.status)).collect();
        told.sort_by_key(|(id, _)| *id);
        let mut expected = vec![
            (running, Some(SagaStatus::Running)),
            (admitted, Some(SagaStatus::Running)),
        ];
        expected.sort_by_key(|(id, _)| *id);
        assert_eq!(told, expected);

        drop(conn);
        listener.unlisten_all().await.ok();
        drop(listener);
        db.drop().await;
    }

    /// A batch that commits as one statement can fail after it committed
    /// (its connection lost before the reply), and the writer then makes
    /// each of its writes again, alone. A new saga made again so finds its
    /// caller's row there already, and must be answered admitted, not
    /// refused: refused, it would be recorded with no one to drive it. (So
    /// it was answered before.) Another start with its key is refused.
    #[tokio::test]
    async fn a_new_saga_made_again_after_its_commit_is_answered_admitted() {
        let db = Database::fresh().await;
        let mut conn = db.pool.acquire().await.unwrap();
        let (saga, other) = (Uuid::now_v7(), Uuid::now_v7());
        for (writes, what) in [
            (
                vec![start(saga, "k"), start(Uuid::now_v7(), "k2")],
                "batched",
            ),
            (vec![start(saga, "k")], "made again alone"),
            (
                vec![start(saga, "k"), start(Uuid::now_v7(), "k3")],
                "made again batched",
            ),
        ] {
            let written = commit_on(&mut conn, true, &writes, None, &mut false)
                .await
                .unwrap();
            assert!(
                matches!(written[0], Written::Start(Admission::Admit)),
                "{what}: refused"
            );
        }
        let refused = commit_on(&mut conn, true, &[start(other, "k")], None, &mut false)
            .await
            .unwrap();
        assert!(matches!(refused[..], [Written::Start(Admission::Refuse)]));
        let sagas: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sagas WHERE saga_id = $1")
            .bind(saga.to_string())
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(sagas, 1);
        drop(conn);
        db.drop().await;
    }

    /// A fresh PostgreSQL database with the engine's tables, and a table
    /// `callers` for [`Keyed`] (with the key `taken` written).
    struct Database {
        admin: sqlx::AnyPool,
        name: String,
        url: String,
        pool: sqlx::AnyPool,
    }

    impl Database {
        async fn fresh() -> Self {
            sqlx::any::install_default_drivers();
            let admin_url = std::env::var("TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let admin = AnyPoolOptions::new()
                .max_connections(1)
                .connect(&admin_url)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is unreachable: {e}"));
            let name = format!("writer_{}", Uuid::new_v4().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&admin)
                .await
                .unwrap();
            let url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
            let pool = AnyPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await
                .unwrap();
            crate::MIGRATIONS_POSTGRES.run(&pool).await.unwrap();
            sqlx::raw_sql(
                "CREATE TABLE callers (key TEXT PRIMARY KEY, saga_id TEXT NOT NULL); \
                 INSERT INTO callers VALUES ('taken', 'someone else')",
            )
            .execute(&pool)
            .await
            .unwrap();
            Database {
                admin,
                name,
                url,
                pool,
            }
        }

        async fn drop(self) {
            self.pool.close().await;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {} WITH (FORCE)",
                self.name
            )))
            .execute(&self.admin)
            .await
            .unwrap();
        }
    }
}
