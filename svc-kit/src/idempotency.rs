//! Runs a mutating request at most once per `request_id`.
//!
//! The request's effect and the record of its `request_id` with its reply commit
//! in one transaction. A repeat returns the stored reply and changes nothing;
//! the same `request_id` with a different payload is refused. Definite refusals
//! (out of stock, unknown SKU, …) are stored too, so a retry sees the same answer.
//!
//! Through the pool ([`run_once`]), the claim is an insert-if-absent that
//! opens the transaction, so it is also the first write: on SQLite it takes
//! the write lock at once, and on PostgreSQL a concurrent duplicate waits on
//! the unique key until the first one commits, then reads its reply. On a
//! SQLite file's batch writer, whose transaction holds the write lock, a
//! read tells a repeat and the claim is written after the effect, with its
//! answer ([`run_on_sqlite`]).
//!
//! Every service has an `idempotency` table of this shape (see its migrations).
//!
//! On PostgreSQL's shared transaction (the saga's steps) the order is the
//! other way round: the effect first, then the claim written together with
//! the reply, in one statement instead of two, or in the effect's own
//! statement. A request seen before is then told by the claim's conflict,
//! and its effect is taken back (see [`crate::shared_transaction::Guard`]);
//! an effect that writes its claim itself writes nothing when the claim is
//! there ([`Refusal::OneStatement`]). When the effect refused or failed
//! instead (a repeat's effect may, because its first's rows are there), the
//! stored answer is looked up before the refusal or failure is: a repeat
//! always gets its first's. A request alone whose effect is one statement
//! runs outside the shared transaction, committing with its statement.
//! Every request in the shared transaction takes its turn, so a repeat can
//! never run beside its first; a repeat on another connection (a second
//! service process) meets the first's effect on the effect's own key (the
//! order's reservation, charge or shipment) and waits for it there.
//!
//! Two ways to run a request:
//! - [`run_once_batched`], for the saga's steps: on a SQLite file, on the
//!   store's batch writer (one hand-over, group commit); on PostgreSQL,
//!   on the shared transaction. The effect is written twice, once per driver.
//! - [`run_once`], for the rest (admin calls): through the pool; on a SQLite
//!   file it waits its turn at the writer's gate.

use prost::Message;
use rusqlite::OptionalExtension;
use sqlx::{AnyConnection, AnyPool, Connection, Row};
use tokio::sync::OwnedMutexGuard;
use tonic::{Code, Status};

use crate::{
    Error,
    batch_writer::Outcome,
    error::DEFINITE_REFUSALS,
    shared_transaction::{Guard, Lone, SharedTransaction, TurnResult},
    store::Store,
    time::now_ms,
};

const CLAIM: &str = "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (request_id) DO NOTHING";
/// The claim and the reply in one row, after the effect (the shared
/// transaction's order; see the module's doc).
const CLAIM_WITH_REPLY: &str = "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
     VALUES ($1, $2, $3, $4, 0, $5) ON CONFLICT (request_id) DO NOTHING";
/// The claim and the reply in one row where no other writer can have
/// claimed the request first (SQLite's batch writer; see [`run_on_sqlite`]):
/// a conflict would be a bug, so it fails the request (its effect undone)
/// rather than go unnoticed.
const CLAIM_WITH_REPLY_ALONE: &str = "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
     VALUES ($1, $2, $3, $4, 0, $5)";
/// The claim and a definite refusal in one row (SQLite's batch writer; see
/// [`run_on_sqlite`]).
const CLAIM_WITH_REFUSAL: &str = "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, status_message, status_details) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";
const STORE_REPLY: &str =
    "UPDATE idempotency SET status_code = 0, reply = $1 WHERE request_id = $2";
const STORED: &str = "SELECT method, fingerprint, status_code, status_message, status_details, reply FROM idempotency WHERE request_id = $1";

/// The identity of a mutating request.
pub struct RequestKey<'a> {
    /// The RPC, e.g. `"ReserveStock"`; a `request_id` is bound to one method.
    pub method: &'static str,
    pub request_id: &'a str,
    /// The encoded request: a repeat must be byte-for-byte the same request.
    pub fingerprint: Vec<u8>,
}

impl<'a> RequestKey<'a> {
    pub fn new(method: &'static str, request_id: &'a str, request: &impl Message) -> Self {
        RequestKey {
            method,
            request_id,
            fingerprint: request.encode_to_vec(),
        }
    }
}

/// A request's claim with its reply, for an effect on the shared
/// transaction that writes it in its own statement (see
/// [`run_once_batched_claiming`]): one round trip fewer per request. The
/// row is the `idempotency` table's, as [`CLAIM_WITH_REPLY`] writes it.
pub struct Claim<'a> {
    request_id: &'a str,
    method: &'static str,
    fingerprint: &'a [u8],
    at_ms: i64,
}

impl Claim<'_> {
    /// The claimed request's ID.
    pub fn request_id(&self) -> &str {
        self.request_id
    }

    /// Binds the claim's row with `reply`, five parameters after those
    /// bound before: `request_id, method, fingerprint, created_at_ms,
    /// reply`, the columns of [`CLAIM_WITH_REPLY`] but its status (0).
    pub fn bind<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        reply: &impl Message,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
        query
            .bind(self.request_id.to_owned())
            .bind(self.method)
            .bind(self.fingerprint.to_vec())
            .bind(self.at_ms)
            .bind(reply.encode_to_vec())
    }
}

impl Claim<'_> {
    /// [`Claim::bind`] for a statement that writes the claim only when its
    /// `request_id` is not NULL: five NULLs of the same types when there is
    /// no claim (the request runs through the pool, the claim first).
    pub fn bind_if_any<'q>(
        claim: Option<&Self>,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
        reply: &impl Message,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
        match claim {
            Some(claim) => claim.bind(query, reply),
            None => query
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(None::<Vec<u8>>)
                .bind(None::<i64>)
                .bind(None::<Vec<u8>>),
        }
    }
}

/// A request's claim with its reply as one item of a combined statement's
/// JSON ([`crate::combined`]), flattened into the item's object: the bytes
/// in hex, which the statement decodes (`decode(fingerprint, 'hex')`).
/// [`crate::claims_of`] inserts them.
#[derive(serde::Serialize)]
pub struct ClaimRow {
    pub request_id: String,
    pub method: &'static str,
    pub fingerprint: String,
    pub at_ms: i64,
    pub reply: String,
}

impl ClaimRow {
    pub fn new(key: &RequestKey<'_>, at_ms: i64, reply: &impl Message) -> Self {
        ClaimRow {
            request_id: key.request_id.to_owned(),
            method: key.method,
            fingerprint: hex(&key.fingerprint),
            at_ms,
            reply: hex(&reply.encode_to_vec()),
        }
    }
}

/// The claims of a combined statement's written items, from `$rows` (a
/// relation with [`ClaimRow`]'s columns): as [`CLAIM_WITH_REPLY`] writes
/// them one by one. No `ON CONFLICT`: a claim inserted by another
/// connection meanwhile fails the statement whole, which then wrote
/// nothing (see [`crate::combined`]).
#[macro_export]
macro_rules! claims_of {
    ($rows:literal) => {
        concat!(
            "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
             SELECT request_id, method, decode(fingerprint, 'hex'), at_ms, 0, decode(reply, 'hex') FROM ",
            $rows
        )
    };
}

/// `bytes` in lower-case hex, as PostgreSQL's `decode(…, 'hex')` reads them
/// (JSON carries no bytes).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[(byte >> 4) as usize] as char);
        out.push(DIGITS[(byte & 15) as usize] as char);
    }
    out
}

/// What an effect given a [`Claim`] did with it.
pub enum Claimed {
    /// Nothing: the claim is written after the effect, as for any effect.
    No,
    /// Written, with the effect's reply, in the effect's own statement.
    Yes,
    /// None: the request was claimed before, and the effect's statement,
    /// which found that claim, wrote nothing. Its reply is not an answer:
    /// the stored one is read. (An effect that can tell a repeat this way
    /// spares its batch the rollback an error costs.)
    Before,
}

/// What an effect on the shared transaction leaves behind when it refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A definite refusal (see [`DEFINITE_REFUSALS`]) wrote nothing: the
    /// effect checks before it writes, or writes in one statement that
    /// writes all of its parts or none. Its turn then needs no savepoint:
    /// a round trip and a subtransaction fewer per request. Any other
    /// failure is taken back by rolling back its batch, whose other
    /// requests run again.
    WritesNothing,
    /// It may have written before it refused: its turn runs inside a
    /// savepoint.
    MayWrite,
    /// As [`Refusal::WritesNothing`], and given the request's [`Claim`] the
    /// effect is one statement that writes all of its parts, the claim
    /// among them, or nothing, whatever happens: it writes nothing when the
    /// request was claimed before, and a race with another connection's
    /// write fails it whole (an error, not a part left out). Alone in its
    /// service, such a request commits with its statement, outside the
    /// shared transaction ([`SharedTransaction::run_alone`]).
    OneStatement,
}

/// Runs `effect` once for `key`: inside one transaction with the claim, or not
/// at all when the key was seen before (then the stored reply is returned).
///
/// `effect` returns the reply, or a `Status`: a definite refusal rolls the effect
/// back and is stored as the reply; any other error rolls back and stores nothing.
pub async fn run_once<Resp>(
    store: &Store,
    key: RequestKey<'_>,
    effect: impl AsyncFnOnce(&mut AnyConnection) -> Result<Resp, Status>,
) -> Result<Resp, Status>
where
    Resp: Message + Default,
{
    let gate = match &store.writer {
        Some(writer) => Some(writer.gate().enter().await),
        None => None,
    };
    run_on_pool(&store.pool, gate, key, effect).await
}

/// [`run_once`] for a hot path: `effect` on the shared transaction on
/// PostgreSQL (through the pool without one), `sqlite_effect` on the batch
/// writer on a SQLite file. The two must do the same thing. `effect` may
/// run more than once on the shared transaction, a clone of it each time
/// (see [`crate::shared_transaction::Guard`]); only the run that commits
/// counts.
pub async fn run_once_batched<Resp>(
    store: &Store,
    key: RequestKey<'_>,
    refusal: Refusal,
    effect: impl AsyncFnOnce(&mut AnyConnection) -> Result<Resp, Status> + Clone,
    sqlite_effect: impl FnOnce(&rusqlite::Connection) -> Result<Resp, Status> + Send + 'static,
) -> Result<Resp, Status>
where
    Resp: Message + Default + Send + 'static,
{
    run_once_batched_claiming(
        store,
        key,
        refusal,
        async move |conn, _| Ok((effect(conn).await?, Claimed::No)),
        sqlite_effect,
    )
    .await
}

/// [`run_once_batched`] for an effect that can write its request's claim
/// itself, in the statement that makes the effect. It is given the
/// [`Claim`] on the shared transaction (and `None` elsewhere: through the
/// pool the claim comes first), and says what it did with it.
pub async fn run_once_batched_claiming<Resp>(
    store: &Store,
    key: RequestKey<'_>,
    refusal: Refusal,
    effect: impl AsyncFnOnce(&mut AnyConnection, Option<&Claim<'_>>) -> Result<(Resp, Claimed), Status>
    + Clone,
    sqlite_effect: impl FnOnce(&rusqlite::Connection) -> Result<Resp, Status> + Send + 'static,
) -> Result<Resp, Status>
where
    Resp: Message + Default + Send + 'static,
{
    if let Some(shared) = &store.shared {
        return run_on_shared(shared, key, refusal, effect).await;
    }
    let Some(writer) = &store.writer else {
        return run_on_pool(&store.pool, None, key, async |conn| {
            Ok(effect(conn, None).await?.0)
        })
        .await;
    };
    let key = OwnedKey {
        method: key.method,
        request_id: key.request_id.to_owned(),
        fingerprint: key.fingerprint,
    };
    writer
        .run(move |conn| run_on_sqlite(conn, &key, sqlite_effect))
        .await
        .map_err(|e| Status::from(Error::StoreUnavailable(e)))?
}

/// A request's effect alone, its one statement committing by itself
/// ([`SharedTransaction::run_alone`]; the effect is
/// [`Refusal::OneStatement`]). It wrote all of its parts and its claim
/// (`Done`), or nothing: a definite refusal is then stored, in a statement
/// of its own (nothing of the effect's to rest on but committed rows), and
/// any other failure is reported as the connection's possible loss.
async fn run_alone_once<Resp>(
    conn: &mut AnyConnection,
    key: &RequestKey<'_>,
    claim: &Claim<'_>,
    effect: impl AsyncFnOnce(&mut AnyConnection, Option<&Claim<'_>>) -> Result<(Resp, Claimed), Status>,
) -> Result<Lone<FirstTurn<Resp>>, sqlx::Error>
where
    Resp: Message + Default,
{
    Ok(match effect(&mut *conn, Some(claim)).await {
        Ok((reply, Claimed::Yes)) => Lone::Ended(FirstTurn::Done(reply)),
        Ok((_, Claimed::Before)) => Lone::Ended(FirstTurn::SeenBefore),
        Ok((_, Claimed::No)) => {
            // It committed without its claim: not an effect that may run
            // alone, whatever its refusal said. A bug: said loudly.
            debug_assert!(false, "{}: an effect run alone wrote no claim", key.method);
            tracing::error!(
                method = key.method,
                request_id = key.request_id,
                "an effect run alone wrote no claim"
            );
            Lone::Ended(FirstTurn::Answered(Err(Error::Internal(format!(
                "{} ran alone without writing its claim",
                key.method
            ))
            .into())))
        }
        Err(status) if DEFINITE_REFUSALS.contains(&status.code()) => Lone::Ended(
            FirstTurn::Answered(record_refusal(&mut *conn, key, &status).await?),
        ),
        Err(status) => Lone::Failed(FirstTurn::Failed(status)),
    })
}

/// How a request's first turn on the shared transaction ended.
enum FirstTurn<Resp> {
    /// Done, and its claim written with the reply.
    Done(Resp),
    /// Its effect ran, but the `request_id` was claimed before: rolled back.
    SeenBefore,
    /// Its effect refused or failed: rolled back.
    Failed(Status),
    /// Its effect refused for good having written nothing, and the refusal
    /// (or the answer of the request seen before) is the answer.
    Answered(Result<Resp, Status>),
}

/// A request on the shared transaction ([`crate::shared_transaction`]):
/// the effect, then the claim with its reply, in one turn (see the module's
/// doc for the order). A request seen before, or refused for good, takes a
/// second turn to read the stored answer or to store its refusal.
async fn run_on_shared<Resp>(
    shared: &SharedTransaction,
    key: RequestKey<'_>,
    refusal: Refusal,
    effect: impl AsyncFnOnce(&mut AnyConnection, Option<&Claim<'_>>) -> Result<(Resp, Claimed), Status>
    + Clone,
) -> Result<Resp, Status>
where
    Resp: Message + Default,
{
    let claim = Claim {
        request_id: key.request_id,
        method: key.method,
        fingerprint: &key.fingerprint,
        at_ms: now_ms(),
    };
    let guard = match refusal {
        Refusal::WritesNothing | Refusal::OneStatement => Guard::Redo,
        Refusal::MayWrite => Guard::Savepoint,
    };
    let writes_nothing = refusal != Refusal::MayWrite;
    // Tried first when the effect allows it; a lone run that failed (a race
    // with another connection, a connection lost) runs again in a batch: a
    // lone run that committed makes the next write nothing (its claim).
    let mut alone = refusal == Refusal::OneStatement;
    // Moved into the turn's work, which is cloned for each run of it.
    let (claim, key_ref) = (&claim, &key);
    let status = loop {
        let effect = effect.clone();
        if std::mem::take(&mut alone) {
            let lone = shared
                .run_alone(async |conn: &mut AnyConnection| {
                    run_alone_once(conn, key_ref, claim, effect.clone()).await
                })
                .await;
            match lone {
                None => {}
                Some(Ok(FirstTurn::Done(reply))) => return Ok(reply),
                Some(Ok(FirstTurn::Answered(answer))) => return answer,
                // It wrote nothing. A repeat's, most often: its first's
                // answer is read alone too. Else, in a batch, it may go
                // through, or find what stood in its way and say so.
                Some(_) => {
                    let stored = shared
                        .run_alone(async |conn: &mut AnyConnection| {
                            Ok(Lone::Ended(stored_answer(&mut *conn, key_ref).await?))
                        })
                        .await;
                    if let Some(Ok(Some(answer))) = stored {
                        return answer;
                    }
                }
            }
        }
        let first = shared
            .run(guard, async move |conn: &mut AnyConnection| {
                let key = key_ref;
                let reply = match effect(&mut *conn, Some(claim)).await {
                    Ok((reply, Claimed::No)) => reply,
                    Ok((reply, Claimed::Yes)) => {
                        return Ok(TurnResult::Written(FirstTurn::Done(reply)));
                    }
                    // Seen before, and nothing written: nothing to take back.
                    Ok((_, Claimed::Before)) => {
                        return Ok(TurnResult::Untouched(FirstTurn::SeenBefore));
                    }
                    // It wrote nothing, and its refusal is stored in this
                    // turn, in the batch whose writes it saw: a refusal may
                    // rest on a neighbour's (the last stock taken), and if
                    // that is undone, so is the refusal, which runs again.
                    Err(status) if writes_nothing && DEFINITE_REFUSALS.contains(&status.code()) => {
                        let answer = record_refusal(&mut *conn, key, &status).await?;
                        return Ok(TurnResult::Written(FirstTurn::Answered(answer)));
                    }
                    Err(status) => return Ok(TurnResult::Nothing(FirstTurn::Failed(status))),
                };
                let claimed = claim
                    .bind(sqlx::query(CLAIM_WITH_REPLY), &reply)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                    == 1;
                Ok(match claimed {
                    true => TurnResult::Written(FirstTurn::Done(reply)),
                    // A repeat: its effect goes, the first one's answer stands.
                    false => TurnResult::Nothing(FirstTurn::SeenBefore),
                })
            })
            .await?;
        match first {
            FirstTurn::Done(reply) => return Ok(reply),
            FirstTurn::Answered(answer) => return answer,
            FirstTurn::Failed(status) => break status,
            FirstTurn::SeenBefore => {}
        }
        // Perhaps claimed earlier in this very batch: the answer holds only
        // once the batch commits, like a written one. A read: it needs no
        // savepoint. Without a savepoint, this request's undo rolled back
        // its batch, and with it a claim made there: then that request
        // runs again, and so does this one (next to it, its turn takes a
        // savepoint).
        let stored = shared
            .run(Guard::Redo, async |conn: &mut AnyConnection| {
                Ok(match stored_answer(&mut *conn, &key).await? {
                    Some(answer) => TurnResult::Written(Some(answer)),
                    None => TurnResult::Untouched(None),
                })
            })
            .await?;
        if let Some(answer) = stored {
            return answer;
        }
    };
    // A repeat's effect may fail because its first's is there (the order's
    // row exists): the first's answer stands, whatever this one said. One
    // statement, or a read: no savepoint is needed.
    shared
        .run(Guard::Redo, async |conn: &mut AnyConnection| {
            if DEFINITE_REFUSALS.contains(&status.code()) {
                // Stored as the answer, unless the request was seen before.
                return Ok(TurnResult::Written(
                    record_refusal(&mut *conn, &key, &status).await?,
                ));
            }
            Ok(match stored_answer(&mut *conn, &key).await? {
                Some(answer) => TurnResult::Written(answer),
                // Not an answer: nothing of it stays, not even a claim.
                None => TurnResult::Untouched(Err(status.clone())),
            })
        })
        .await?
}

struct OwnedKey {
    method: &'static str,
    request_id: String,
    fingerprint: Vec<u8>,
}

/// The same steps as [`run_on_pool`], inside the batch writer's savepoint
/// for this request. Nothing else writes the file meanwhile (the batch's
/// transaction began IMMEDIATE: it holds SQLite's write lock), so a read
/// tells a repeat, and the claim is written once, with its answer, after
/// the effect: one write of the row instead of a claim and then its
/// reply. A definite refusal is stored in
/// place of whatever the effect wrote before it refused (the batch writer
/// undoes the job's writes first), which spares every request a savepoint
/// of its own around the effect: two statements, and a copy of each page
/// the effect changed into SQLite's statement journal (docs/benchmarks.md).
fn run_on_sqlite<Resp: Message + Default>(
    conn: &rusqlite::Connection,
    key: &OwnedKey,
    effect: impl FnOnce(&rusqlite::Connection) -> Result<Resp, Status>,
) -> rusqlite::Result<Outcome<Result<Resp, Status>>> {
    if let Some(stored) = stored_sqlite(conn, key)? {
        return Ok(Outcome::Keep(stored));
    }
    match effect(conn) {
        Ok(reply) => {
            conn.prepare_cached(CLAIM_WITH_REPLY_ALONE)?
                .execute(rusqlite::params![
                    key.request_id,
                    key.method,
                    key.fingerprint,
                    now_ms(),
                    reply.encode_to_vec(),
                ])?;
            Ok(Outcome::Keep(Ok(reply)))
        }
        Err(status) if DEFINITE_REFUSALS.contains(&status.code()) => {
            let (request_id, method, fingerprint) =
                (key.request_id.clone(), key.method, key.fingerprint.clone());
            let stored = as_stored(&status);
            Ok(Outcome::UndoThen(
                Err(stored),
                Box::new(move |conn| {
                    conn.prepare_cached(CLAIM_WITH_REFUSAL)?
                        .execute(rusqlite::params![
                            request_id,
                            method,
                            fingerprint,
                            now_ms(),
                            status.code() as i32 as i64,
                            status.message(),
                            stored_details(&status),
                        ])?;
                    Ok(())
                }),
            ))
        }
        // Not an answer: leave no trace.
        Err(status) => Ok(Outcome::Undo(Err(status))),
    }
}

/// The answer stored for this request, if it was seen before.
fn stored_sqlite<Resp: Message + Default>(
    conn: &rusqlite::Connection,
    key: &OwnedKey,
) -> rusqlite::Result<Option<Result<Resp, Status>>> {
    let stored = conn
        .prepare_cached(STORED)?
        .query_row(rusqlite::params![key.request_id], |r| {
            Ok(Stored {
                method: r.get(0)?,
                fingerprint: r.get(1)?,
                status_code: r.get(2)?,
                status_message: r.get(3)?,
                status_details: r.get(4)?,
                reply: r.get(5)?,
            })
        })
        .optional()?;
    Ok(stored.map(|stored| stored.answer(key.method, &key.request_id, &key.fingerprint)))
}

async fn run_on_pool<Resp>(
    pool: &AnyPool,
    gate: Option<OwnedMutexGuard<()>>,
    key: RequestKey<'_>,
    effect: impl AsyncFnOnce(&mut AnyConnection) -> Result<Resp, Status>,
) -> Result<Resp, Status>
where
    Resp: Message + Default,
{
    let mut conn = TxConnection::new(pool.acquire().await.map_err(Error::from)?, gate);
    let mut tx = conn.begin().await.map_err(Error::from)?;
    let claimed = sqlx::query(CLAIM)
        .bind(key.request_id)
        .bind(key.method)
        .bind(key.fingerprint.clone())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(Error::from)?
        .rows_affected()
        == 1;
    if !claimed {
        tx.rollback().await.map_err(Error::from)?;
        // A read from here on: the gate goes with the connection.
        conn.ended = true;
        drop(conn);
        let mut conn = pool.acquire().await.map_err(Error::from)?;
        return replay(&mut conn, &key).await.map_err(Error::from)?;
    }

    match effect(&mut tx).await {
        Ok(reply) => {
            sqlx::query(STORE_REPLY)
                .bind(reply.encode_to_vec())
                .bind(key.request_id)
                .execute(&mut *tx)
                .await
                .map_err(Error::from)?;
            tx.commit().await.map_err(Error::from)?;
            conn.ended = true;
            Ok(reply)
        }
        Err(status) => {
            // Undo any partial effect first (and free the connection).
            tx.rollback().await.map_err(Error::from)?;
            conn.ended = true;
            let gate = conn.gate.take();
            drop(conn);
            if DEFINITE_REFUSALS.contains(&status.code()) {
                // Its write, behind the gate still.
                let mut conn = TxConnection::new(pool.acquire().await.map_err(Error::from)?, gate);
                let answer = record_refusal(&mut conn, &key, &status)
                    .await
                    .map_err(Error::from)?;
                conn.ended = true;
                answer
            } else {
                Err(status)
            }
        }
    }
}

/// The pooled connection of one transaction (or one write), with the batch
/// writer's gate on a SQLite file. Dropped before it ended (tonic drops a
/// request whose client left, wherever it is), it is closed instead of going
/// back to the pool, which ends the transaction on the server. sqlx 0.9
/// hands back a connection whose `BEGIN` was cancelled in flight still
/// inside the transaction: the next statements on it would never commit,
/// and their locks would block every retry.
///
/// The gate is given back only once such a connection is closed: until
/// then a statement of it may still run on sqlx's worker thread, holding
/// the file's write lock, and the batch writer, next through the gate,
/// would sleep in SQLite's busy handler at the locked file.
struct TxConnection {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    /// Its transaction ended (committed or rolled back): it may go back to
    /// the pool, and the gate with it.
    ended: bool,
    gate: Option<OwnedMutexGuard<()>>,
}

impl TxConnection {
    fn new(conn: sqlx::pool::PoolConnection<sqlx::Any>, gate: Option<OwnedMutexGuard<()>>) -> Self {
        TxConnection {
            conn: Some(conn),
            ended: false,
            gate,
        }
    }
}

impl std::ops::Deref for TxConnection {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for TxConnection {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for TxConnection {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if self.ended {
            return;
        }
        match (self.gate.take(), tokio::runtime::Handle::try_current()) {
            (Some(gate), Ok(runtime)) => {
                runtime.spawn(async move {
                    // Answered once sqlx's worker has run what was queued
                    // before it and closed the file.
                    let _ = conn.close().await;
                    drop(gate);
                });
            }
            _ => conn.close_on_drop(),
        }
    }
}

/// Stores a definite refusal as the reply of `key`, unless a concurrent request
/// with the same key got there first; then its reply wins.
async fn record_refusal<Resp: Message + Default>(
    conn: &mut AnyConnection,
    key: &RequestKey<'_>,
    status: &Status,
) -> Result<Result<Resp, Status>, sqlx::Error> {
    let stored = sqlx::query(
        "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, status_message, status_details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(key.request_id)
    .bind(key.method)
    .bind(key.fingerprint.clone())
    .bind(now_ms())
    .bind(status.code() as i32 as i64)
    .bind(status.message())
    .bind(stored_details(status))
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if stored {
        Ok(Err(as_stored(status)))
    } else {
        replay(conn, key).await
    }
}

/// Returns the stored reply of a `request_id` seen before.
async fn replay<Resp: Message + Default>(
    conn: &mut AnyConnection,
    key: &RequestKey<'_>,
) -> Result<Result<Resp, Status>, sqlx::Error> {
    stored_answer(conn, key)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// The stored answer of `key`'s `request_id`, if it was seen before.
async fn stored_answer<Resp: Message + Default>(
    conn: &mut AnyConnection,
    key: &RequestKey<'_>,
) -> Result<Option<Result<Resp, Status>>, sqlx::Error> {
    let Some(row) = sqlx::query(STORED)
        .bind(key.request_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let stored = Stored {
        method: row.try_get("method")?,
        fingerprint: row.try_get("fingerprint")?,
        status_code: row.try_get("status_code")?,
        status_message: row.try_get("status_message")?,
        status_details: row.try_get("status_details")?,
        reply: row.try_get("reply")?,
    };
    Ok(Some(stored.answer(
        key.method,
        key.request_id,
        &key.fingerprint,
    )))
}

/// A request's row in the `idempotency` table.
struct Stored {
    method: String,
    fingerprint: Vec<u8>,
    status_code: Option<i64>,
    status_message: Option<String>,
    /// The refusal's rich error details (`google.rpc.Status` details).
    status_details: Option<Vec<u8>>,
    reply: Option<Vec<u8>>,
}

/// A refusal's details as stored: `None` when it has none.
fn stored_details(status: &Status) -> Option<Vec<u8>> {
    (!status.details().is_empty()).then(|| status.details().to_vec())
}

/// A refusal as a replay will answer it: code, message and details, and no
/// metadata (which is not stored), so the first answer and every replay agree.
fn as_stored(status: &Status) -> Status {
    Status::with_details(
        status.code(),
        status.message(),
        bytes::Bytes::copy_from_slice(status.details()),
    )
}

impl Stored {
    /// The stored answer, if this is the same request.
    fn answer<Resp: Message + Default>(
        self,
        method: &str,
        request_id: &str,
        fingerprint: &[u8],
    ) -> Result<Resp, Status> {
        if self.method != method || self.fingerprint != fingerprint {
            return Err(Error::RequestIdReused {
                request_id: request_id.to_owned(),
                method: self.method,
            }
            .into());
        }
        match (self.status_code, self.reply) {
            (Some(0), Some(reply)) => Resp::decode(reply.as_slice())
                .map_err(|e| Error::Internal(format!("stored reply of {request_id}: {e}")).into()),
            (Some(code), _) if code != 0 => Err(Status::with_details(
                Code::from_i32(code as i32),
                self.status_message.unwrap_or_default(),
                self.status_details.unwrap_or_default().into(),
            )),
            _ => Err(Error::Internal(format!("request {request_id} has no stored reply")).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::batch_writer::{BatchWriter, WriteGate, hold_writer};

    fn store_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE idempotency (request_id TEXT PRIMARY KEY, method TEXT NOT NULL, \
                   fingerprint BLOB NOT NULL, created_at_ms INTEGER NOT NULL, status_code INTEGER, \
                   status_message TEXT, reply BLOB, status_details BLOB); \
                 CREATE TABLE effects (request_id TEXT NOT NULL)",
            )
            .unwrap();
        (dir, path)
    }

    fn key(request_id: &str) -> OwnedKey {
        OwnedKey {
            method: "Test",
            request_id: request_id.to_owned(),
            fingerprint: vec![1, 2, 3],
        }
    }

    /// The request's effect: one row, then `answer`.
    fn run(
        writer: &BatchWriter,
        request_id: &'static str,
        answer: Result<(), Status>,
    ) -> impl Future<Output = Result<Result<(), Status>, String>> + use<> {
        let writer = writer.clone();
        async move {
            writer
                .run(move |conn| {
                    run_on_sqlite(conn, &key(request_id), |conn| {
                        conn.execute("INSERT INTO effects VALUES ($1)", [request_id])
                            .map_err(|e| Status::internal(e.to_string()))?;
                        answer
                    })
                })
                .await
        }
    }

    /// A repeat in the same batch as its first, read where the first wrote
    /// its claim in the batch's open transaction: after a reply and after a
    /// refusal (whose effect was undone before its claim was written in its
    /// place), it gets the first's answer and its effect never runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeat_in_its_firsts_batch_gets_the_firsts_answer() {
        let (_dir, path) = store_file();
        let writer = BatchWriter::open(
            &path,
            WriteGate::default(),
            crate::durability::Durability::Full,
        )
        .unwrap();
        // Hold the writer's thread, so that the four requests share a batch.
        let (hold, holding) = hold_writer(&writer);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = || Err(Status::failed_precondition("out of stock"));
        let first_ok = tokio::spawn(run(&writer, "ok", Ok(())));
        let first_refused = tokio::spawn(run(&writer, "no", refused()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Their effects would succeed: only a replay answers them as the first.
        let repeat_ok = tokio::spawn(run(&writer, "ok", refused()));
        let repeat_refused = tokio::spawn(run(&writer, "no", Ok(())));
        tokio::time::sleep(Duration::from_millis(50)).await;
        hold.send(()).unwrap();
        holding.await.unwrap().unwrap();
        for (request, expect_ok) in [
            (first_ok, true),
            (first_refused, false),
            (repeat_ok, true),
            (repeat_refused, false),
        ] {
            let answer = request.await.unwrap().expect("the batch commits");
            match expect_ok {
                true => answer.expect("the first's reply"),
                false => assert_eq!(answer.unwrap_err().code(), Code::FailedPrecondition),
            }
        }
        let conn = rusqlite::Connection::open(&path).unwrap();
        let effects: Vec<String> = conn
            .prepare("SELECT request_id FROM effects")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            effects,
            vec!["ok"],
            "one effect, the first's; the refused one undone"
        );
        let claims: i64 = conn
            .query_row("SELECT COUNT(*) FROM idempotency", [], |r| r.get(0))
            .unwrap();
        assert_eq!(claims, 2, "one claim per request_id");
    }
}
