//! Group commit on PostgreSQL: the saga steps' requests take turns on one
//! open transaction, and one `COMMIT` makes a whole batch of them durable at
//! once.
//!
//! Why: the steps of concurrent orders write the same hot rows (a popular
//! SKU's stock, one customer's balance). In a transaction of its own, each
//! request held that row's lock through its commit's WAL flush, so requests
//! queued one flush apiece behind each other. On the shared transaction they
//! never wait on each other's locks, and a flush serves the whole batch. It
//! is what the batch writer ([`crate::batch_writer`]) does for a SQLite file.
//!
//! The rules:
//! - A request's reply (or stored refusal) is returned only after the commit
//!   of its batch. If that commit fails, every request of the batch gets
//!   UNAVAILABLE and nothing of theirs was written; a retry with the same
//!   `request_id` runs again. A `COMMIT` that does not answer within its
//!   timeout (10 s by default) also fails the batch, with UNAVAILABLE: its
//!   outcome is unknown, and a retry replays the stored reply or runs again.
//! - A request whose writes must not stay (it failed, or its work says
//!   so) takes them back without taking back its neighbours'. How depends
//!   on its [`Guard`]:
//!   - [`Guard::Savepoint`]: its turn runs inside a savepoint, and is
//!     rolled back to it. A round trip per request, and a subtransaction.
//!   - [`Guard::Redo`]: no savepoint. The work promises that it writes
//!     nothing when it refuses ([`TurnResult::Untouched`]), the common way
//!     a turn ends without writing. When it must be undone all the same
//!     (a statement failed, which on PostgreSQL aborts the transaction),
//!     the whole batch is rolled back and its other requests run their
//!     work again, each inside a savepoint this time, in the next batch:
//!     they never hear of it. A redone request is never redone twice for
//!     an undo: its batch guards every turn after it. (A neighbour dropped
//!     midway, below, can still send it round again.)
//!
//!   The first request of a batch needs no savepoint either way: it rolls
//!   back the transaction, still empty.
//! - A request dropped in the middle of its turn (its client left, its
//!   deadline passed) leaves the transaction in an unknown state: the batch
//!   is rolled back whole by closing its connection (no `COMMIT` can follow
//!   on it), and its other requests run their work again in the next
//!   batch, as after an undone turn: they never hear of it. Under overload,
//!   where the services' deadlines drop late requests, a late one no
//!   longer costs its whole batch an UNAVAILABLE and a retry from afar.
//! - The committer commits as soon as a turn ends and it gets the lock: the
//!   requests that queued meanwhile form the next batch. One request alone
//!   waits no timer.
//! - A request alone (no other in flight, no batch open) whose work is one
//!   statement that writes all of its parts or none, whatever happens,
//!   may skip the transaction ([`SharedTransaction::run_alone`]): its
//!   statement commits by itself. `BEGIN` and `COMMIT` were two of its
//!   three round trips, each on the path of the saga step that waits.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use sqlx::{Any, AnyConnection, AnyPool, Connection, pool::PoolConnection};
use tokio::{
    sync::{Mutex, MutexGuard, Notify, mpsc, watch},
    time::Instant,
};

use crate::{Error, error::connection_lost, store::PING_WHEN_IDLE_FOR};

/// How one batch ended: `None` while it is open.
type Ended = watch::Sender<Option<BatchEnd>>;

/// How one batch ended.
#[derive(Debug, Clone)]
enum BatchEnd {
    Committed,
    /// Rolled back: nothing of its members was written.
    Failed(String),
    /// Rolled back for one member's sake: the others run again.
    Redo,
    /// A member was dropped in the middle of its turn: rolled back by
    /// closing the connection, whose state is unknown; the others run again.
    Abandoned,
}

/// How a turn's writes are taken back when they must not stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// A savepoint before the turn, rolled back to.
    Savepoint,
    /// No savepoint: the work writes nothing when it returns
    /// [`TurnResult::Untouched`]; if it must be undone otherwise, the whole
    /// batch is rolled back and its other requests run again.
    Redo,
}

/// The open transaction that the hot requests share (PostgreSQL only).
#[derive(Clone)]
pub struct SharedTransaction {
    inner: Arc<Inner>,
    /// Held by every handle: the committer stops when the last is dropped.
    _alive: mpsc::Sender<()>,
}

struct Inner {
    pool: AnyPool,
    /// How long a `COMMIT` may take before its batch is given up.
    commit_timeout: Duration,
    /// Batches committed so far.
    commits: AtomicU64,
    /// Savepoints taken so far (each a round trip).
    savepoints: AtomicU64,
    /// Turns run again because a neighbour's undo rolled their batch back.
    redone: AtomicU64,
    /// Requests that ran alone, outside the shared transaction.
    alone: AtomicU64,
    /// Requests written by combined statements ([`crate::combined`]).
    combined: AtomicU64,
    /// Requests in [`SharedTransaction::run`] or
    /// [`SharedTransaction::run_alone`] now.
    in_flight: AtomicUsize,
    turn: Mutex<Turn>,
    /// Wakes the committer when a turn ended.
    turns_ended: Notify,
}

struct Turn {
    /// The connection of the open transaction (`None`: none is open).
    conn: Option<PoolConnection<Any>>,
    /// The connection of the last batch, kept for the next one, and since
    /// when: taken from the pool and given back, it cost two more round
    /// trips per batch (sqlx pings a connection on both).
    kept: Option<(PoolConnection<Any>, Instant)>,
    /// Requests whose writes are in the open transaction.
    members: usize,
    /// Told how the open batch ended.
    batch: Arc<Ended>,
    /// A request was dropped mid-turn: the open transaction must not commit.
    poisoned: bool,
    /// The savepoint of the last turn is still there: released by the next
    /// turn in the same round trip as its own savepoint, or by `COMMIT`.
    savepoint: bool,
    /// A turn run again is in the open batch: every later turn of it takes
    /// a savepoint, so that no turn is redone twice.
    guard_all: bool,
}

impl Turn {
    /// Ends the open batch: its members hear `result`; the connection is
    /// kept for the next batch only after a commit.
    fn end_batch(&mut self, end: BatchEnd) {
        if let Some(mut conn) = self.conn.take() {
            match &end {
                // A redo's `ROLLBACK` was answered: the connection is clean.
                BatchEnd::Committed | BatchEnd::Redo => self.kept = Some((conn, Instant::now())),
                // Closing the connection ends the transaction on the server.
                BatchEnd::Failed(_) | BatchEnd::Abandoned => conn.close_on_drop(),
            }
        }
        self.members = 0;
        self.poisoned = false;
        self.savepoint = false;
        self.guard_all = false;
        let ended = std::mem::replace(&mut self.batch, Arc::new(watch::channel(None).0));
        ended.send_replace(Some(end));
    }

    /// Rolls the open batch back if a dropped request left it poisoned;
    /// its other members run again.
    fn clear_poison(&mut self) {
        if self.poisoned {
            tracing::debug!(
                members = self.members,
                "a request was dropped in the middle of its turn: its batch runs again"
            );
            self.end_batch(BatchEnd::Abandoned);
        }
    }
}

/// A turn in progress: dropped before [`InTurn::finish`] (the request's
/// future was dropped), it poisons the open transaction.
struct InTurn<'a> {
    turn: MutexGuard<'a, Turn>,
    finished: bool,
    /// The committer, to roll the poisoned batch back at once.
    committer: &'a Notify,
}

impl Drop for InTurn<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.turn.poisoned = true;
            self.committer.notify_one();
        }
    }
}

/// What a turn left behind.
pub enum TurnResult<T> {
    /// Written into the batch: the answer holds once the batch commits.
    Written(T),
    /// It wrote nothing: there is nothing to take back.
    Untouched(T),
    /// What it wrote must not stay: it is taken back (see [`Guard`]).
    Nothing(T),
}

/// How a lone statement ended ([`SharedTransaction::run_alone`]).
pub enum Lone<T> {
    /// As statements end: it wrote, or refused having written nothing. Its
    /// connection is kept for the next.
    Ended(T),
    /// It failed, perhaps because its connection was lost: that connection
    /// is closed rather than kept.
    Failed(T),
}

impl<T> Lone<T> {
    fn into_answer(self) -> T {
        match self {
            Lone::Ended(answer) | Lone::Failed(answer) => answer,
        }
    }
}

/// How long a `COMMIT` may take before its batch is given up (the default).
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

impl SharedTransaction {
    /// A `COMMIT` that has not answered after `commit_timeout` (a stalled
    /// server, a cut link) fails its batch, whose outcome is then unknown:
    /// it holds up every hot request of the service while it waits.
    pub fn new(pool: AnyPool, commit_timeout: Duration) -> Self {
        let inner = Arc::new(Inner {
            pool,
            commit_timeout,
            commits: AtomicU64::new(0),
            savepoints: AtomicU64::new(0),
            redone: AtomicU64::new(0),
            alone: AtomicU64::new(0),
            combined: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            turn: Mutex::new(Turn {
                conn: None,
                kept: None,
                members: 0,
                batch: Arc::new(watch::channel(None).0),
                poisoned: false,
                savepoint: false,
                guard_all: false,
            }),
            turns_ended: Notify::new(),
        });
        let (alive, handles) = mpsc::channel(1);
        tokio::spawn(commit_batches(inner.clone(), handles));
        SharedTransaction {
            inner,
            _alive: alive,
        }
    }

    /// How many batches committed so far.
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    /// How many savepoints turns took so far.
    pub fn savepoints(&self) -> u64 {
        self.inner.savepoints.load(Ordering::Relaxed)
    }

    /// How many turns ran again so far, their batch rolled back for a
    /// neighbour's undo ([`Guard::Redo`]).
    pub fn redone(&self) -> u64 {
        self.inner.redone.load(Ordering::Relaxed)
    }

    /// How many requests ran alone so far ([`Self::run_alone`]).
    pub fn alone(&self) -> u64 {
        self.inner.alone.load(Ordering::Relaxed)
    }

    /// How many requests combined statements wrote so far
    /// ([`crate::combined`]).
    pub fn combined(&self) -> u64 {
        self.inner.combined.load(Ordering::Relaxed)
    }

    pub(crate) fn count_combined(&self, requests: u64) {
        self.inner.combined.fetch_add(requests, Ordering::Relaxed);
    }

    /// Runs `work` outside the shared transaction, its one statement
    /// committing by itself, when this request is the only one in flight
    /// and no batch is open; `None` otherwise, and the caller takes its
    /// turn with [`Self::run`]. Under load requests still share their
    /// commits (and a hot row's lock is never held through a flush apiece).
    ///
    /// What `work` promises, since nothing can roll it back: it is one
    /// statement that writes all of its parts or nothing, in every outcome.
    /// A race with another connection must fail it whole (an error, not a
    /// part left out), and run again it must write nothing more (its
    /// request's claim is one of its parts): a connection lost under it
    /// leaves its outcome unknown, and it runs again on another.
    pub async fn run_alone<T>(
        &self,
        work: impl AsyncFnOnce(&mut AnyConnection) -> Result<Lone<T>, sqlx::Error> + Clone,
    ) -> Option<Result<T, Error>> {
        let _in_flight = InFlight::enter(&self.inner);
        if self.inner.in_flight.load(Ordering::SeqCst) > 1 {
            return None;
        }
        let mut turn = self.inner.turn.lock().await;
        turn.clear_poison();
        // Whoever came meanwhile waits on the lock held here, and opens the
        // next batch after this request's statement.
        if turn.conn.is_some() || self.inner.in_flight.load(Ordering::SeqCst) > 1 {
            return None;
        }
        let result = run_lone_statement(&self.inner.pool, &mut turn, work).await;
        if let Ok(Lone::Ended(_)) = &result {
            self.inner.alone.fetch_add(1, Ordering::Relaxed);
        }
        Some(result.map(Lone::into_answer).map_err(Error::from))
    }

    /// Runs `work` in its turn on the shared transaction and returns its
    /// answer: at once if nothing of it was written, else once its batch
    /// committed. What it wrote is taken back as `guard` says when it fails
    /// or returns [`TurnResult::Nothing`]. `work` may be run again, a clone
    /// of it (another request's undo rolled its batch back, see
    /// [`Guard::Redo`]): only the answer of the run that committed is
    /// returned.
    pub async fn run<T>(
        &self,
        guard: Guard,
        work: impl AsyncFnOnce(&mut AnyConnection) -> Result<TurnResult<T>, sqlx::Error> + Clone,
    ) -> Result<T, Error> {
        let _in_flight = InFlight::enter(&self.inner);
        let mut redo = false;
        loop {
            let mut turn = InTurn {
                turn: self.inner.turn.lock().await,
                finished: false,
                committer: &self.inner.turns_ended,
            };
            turn.turn.clear_poison();
            if redo {
                // Its batch guards every turn after it: never redone twice.
                turn.turn.guard_all = true;
            }
            let guard = if redo { Guard::Savepoint } else { guard };
            let result = take_turn(&self.inner, &mut turn.turn, guard, work.clone()).await;
            turn.finished = true;
            let ended = match &result {
                Ok(TurnResult::Written(_)) => {
                    turn.turn.members += 1;
                    Some(turn.turn.batch.subscribe())
                }
                Ok(TurnResult::Untouched(_) | TurnResult::Nothing(_)) => None,
                Err(err) => {
                    // The transaction's state is unknown: roll the batch back.
                    let err = format!("a statement of the shared transaction failed: {err}");
                    turn.turn.end_batch(BatchEnd::Failed(err));
                    None
                }
            };
            drop(turn);
            self.inner.turns_ended.notify_one();
            let (answer, mut ended) = match result.map_err(Error::from)? {
                TurnResult::Untouched(answer) | TurnResult::Nothing(answer) => {
                    return answer.map_err(Error::from);
                }
                TurnResult::Written(answer) => (answer, ended.expect("a written turn subscribed")),
            };
            match ended.wait_for(Option::is_some).await.as_deref() {
                Ok(Some(BatchEnd::Committed)) => return answer.map_err(Error::from),
                Ok(Some(BatchEnd::Redo | BatchEnd::Abandoned)) => {
                    self.inner.redone.fetch_add(1, Ordering::Relaxed);
                    redo = true;
                }
                Ok(Some(BatchEnd::Failed(err))) => {
                    return Err(Error::StoreUnavailable(format!(
                        "the batch of this request did not commit: {err}"
                    )));
                }
                _ => return Err(Error::StoreUnavailable("the committer stopped".into())),
            }
        }
    }
}

/// A request counted in flight while it lives.
struct InFlight<'a>(&'a Inner);

impl<'a> InFlight<'a> {
    fn enter(inner: &'a Inner) -> Self {
        inner.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(inner)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection of a lone statement: dropped before the statement ended
/// (its request's client left), it is closed, not handed back to the pool
/// in the middle of an exchange.
struct LoneConnection(Option<PoolConnection<Any>>);

impl Drop for LoneConnection {
    fn drop(&mut self) {
        if let Some(conn) = self.0.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// [`SharedTransaction::run_alone`]'s statement, on the connection the last
/// batch left (unpinged, as [`open_batch`] takes it) or one from the pool.
/// A connection lost under it (the server closed it) is closed, and the
/// statement runs again on one that answers: its first run's outcome is
/// unknown, and a second writes nothing more (`work`'s promise). The
/// connection is kept for the next batch unless it was lost, or `work`
/// failed in a way that may have been its loss ([`Lone::Failed`]).
async fn run_lone_statement<T>(
    pool: &AnyPool,
    turn: &mut Turn,
    work: impl AsyncFnOnce(&mut AnyConnection) -> Result<Lone<T>, sqlx::Error> + Clone,
) -> Result<Lone<T>, sqlx::Error> {
    let kept = match turn.kept.take() {
        Some((conn, since)) if since.elapsed() < PING_WHEN_IDLE_FOR => Some(conn),
        _ => None,
    };
    let mut conn = LoneConnection(Some(match kept {
        Some(conn) => conn,
        None => pool.acquire().await?,
    }));
    let mut result = work.clone()(conn.0.as_mut().expect("a connection")).await;
    if let Err(err) = &result
        && connection_lost(err)
    {
        tracing::info!(error = %err, "a lone statement's connection was lost; it runs again on another");
        drop(conn);
        conn = LoneConnection(Some(answering(pool).await?));
        result = work(conn.0.as_mut().expect("a connection")).await;
    }
    let keep = match &result {
        Ok(Lone::Ended(_)) => true,
        Ok(Lone::Failed(_)) => false,
        Err(err) => !connection_lost(err),
    };
    if keep {
        turn.kept = conn.0.take().map(|conn| (conn, Instant::now()));
    }
    result
}

/// One turn: `work`, inside a savepoint if `guard` (or its batch) says so.
/// The outer error is the shared transaction's own (its state is then
/// unknown); `work`'s own failure is taken back and returned as
/// [`TurnResult::Nothing`].
async fn take_turn<T>(
    inner: &Inner,
    turn: &mut Turn,
    guard: Guard,
    work: impl AsyncFnOnce(&mut AnyConnection) -> Result<TurnResult<T>, sqlx::Error>,
) -> Result<TurnResult<Result<T, sqlx::Error>>, sqlx::Error> {
    // Nothing of another request in the transaction yet: no savepoint is
    // needed, a failure rolls the whole (so far empty) transaction back.
    let alone = turn.members == 0;
    if turn.conn.is_none() {
        open_batch(&inner.pool, turn).await?;
    }
    let guarded = !alone && (guard == Guard::Savepoint || turn.guard_all);
    let conn = turn.conn.as_mut().expect("a batch is open");
    if guarded {
        // The last turn's savepoint is released here, in this turn's round
        // trip, rather than in one of its own: a round trip fewer per request.
        let sql = match turn.savepoint {
            true => "RELEASE SAVEPOINT request; SAVEPOINT request",
            false => "SAVEPOINT request",
        };
        sqlx::raw_sql(sql).execute(&mut **conn).await?;
        turn.savepoint = true;
        inner.savepoints.fetch_add(1, Ordering::Relaxed);
    }
    let (outcome, undo) = match work(&mut **conn).await {
        Ok(TurnResult::Written(answer)) => return Ok(TurnResult::Written(Ok(answer))),
        Ok(TurnResult::Untouched(answer)) => (Ok(answer), false),
        Ok(TurnResult::Nothing(answer)) => (Ok(answer), true),
        Err(err) => (Err(err), true),
    };
    if alone {
        sqlx::raw_sql("ROLLBACK").execute(&mut **conn).await?;
        // Ended: the connection is kept for the next batch, which a turn
        // run again that ended here no longer guards.
        turn.kept = turn.conn.take().map(|conn| (conn, Instant::now()));
        turn.guard_all = false;
    } else if !undo {
        // Nothing to take back; a savepoint stays (empty) for the next
        // turn to release.
        return Ok(TurnResult::Untouched(outcome));
    } else if guarded {
        // The savepoint stays (empty) for the next turn to release.
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT request")
            .execute(&mut **conn)
            .await?;
    } else {
        // Unguarded: the batch goes back whole, and its others run again.
        sqlx::raw_sql("ROLLBACK").execute(&mut **conn).await?;
        tracing::debug!(
            members = turn.members,
            "a turn without a savepoint was undone: its batch runs again"
        );
        turn.end_batch(BatchEnd::Redo);
    }
    Ok(TurnResult::Nothing(outcome))
}

/// Opens a batch: `BEGIN` on the connection the last batch left, or on one
/// from the pool. The connection is held by the turn before `BEGIN` is sent:
/// a request dropped with `BEGIN` in flight poisons the batch, which closes
/// the connection (sqlx would hand it back to the pool inside the
/// transaction).
///
/// A kept connection is not pinged (that round trip is what keeping it
/// saves). If the server closed it meanwhile, `BEGIN` fails on it: it is
/// closed and the batch opens on another, as `BEGIN` changed nothing. One
/// kept for longer than [`PING_WHEN_IDLE_FOR`] goes back to the pool, which
/// pings it.
async fn open_batch(pool: &AnyPool, turn: &mut Turn) -> Result<(), sqlx::Error> {
    if let Some((conn, since)) = turn.kept.take()
        && since.elapsed() < PING_WHEN_IDLE_FOR
    {
        let conn = turn.conn.insert(conn);
        match sqlx::raw_sql("BEGIN").execute(&mut **conn).await {
            Ok(_) => return Ok(()),
            Err(err) => {
                tracing::info!(error = %err, "the kept connection failed at BEGIN; the batch opens on another");
                if let Some(mut conn) = turn.conn.take() {
                    conn.close_on_drop();
                }
                // The pool's may be closed too (the server restarted), and
                // it hands out unpinged those used within the last second.
                let conn = turn.conn.insert(answering(pool).await?);
                sqlx::raw_sql("BEGIN").execute(&mut **conn).await?;
                return Ok(());
            }
        }
    }
    let conn = turn.conn.insert(pool.acquire().await?);
    sqlx::raw_sql("BEGIN").execute(&mut **conn).await?;
    Ok(())
}

/// A connection from the pool that answers a ping (each that does not is
/// closed), trying at most as many as the pool holds.
async fn answering(pool: &AnyPool) -> Result<PoolConnection<Any>, sqlx::Error> {
    let mut closed = 0;
    loop {
        let mut conn = pool.acquire().await?;
        match conn.ping().await {
            Ok(()) => return Ok(conn),
            Err(err) if closed >= pool.options().get_max_connections() => return Err(err),
            Err(_) => {
                conn.close_on_drop();
                closed += 1;
            }
        }
    }
}

/// Commits the open batch whenever a turn ended, until every handle is gone.
async fn commit_batches(inner: Arc<Inner>, mut handles: mpsc::Receiver<()>) {
    loop {
        tokio::select! {
            _ = inner.turns_ended.notified() => {}
            _ = handles.recv() => return,
        }
        let mut turn = inner.turn.lock().await;
        turn.clear_poison();
        let Some(conn) = turn.conn.as_mut() else {
            continue;
        };
        let commit = sqlx::raw_sql("COMMIT").execute(&mut **conn);
        let end = match tokio::time::timeout(inner.commit_timeout, commit).await {
            Ok(Ok(_)) => BatchEnd::Committed,
            Ok(Err(err)) => BatchEnd::Failed(err.to_string()),
            // Cut off mid-COMMIT, the connection is closed (`end_batch`);
            // whether the server committed is unknown.
            Err(_) => BatchEnd::Failed(format!(
                "COMMIT did not answer within {:?}; its outcome is unknown",
                inner.commit_timeout
            )),
        };
        match &end {
            BatchEnd::Committed => {
                inner.commits.fetch_add(1, Ordering::Relaxed);
            }
            BatchEnd::Failed(err) => {
                tracing::warn!(error = %err, members = turn.members, "the shared transaction did not commit");
            }
            BatchEnd::Redo | BatchEnd::Abandoned => {
                unreachable!("only a turn ends its batch for a redo")
            }
        }
        turn.end_batch(end);
    }
}
