//! Runs a mutating request at most once per `request_id`.
//!
//! The request's effect and the record of its `request_id` with its reply commit
//! in one transaction. A repeat returns the stored reply and changes nothing;
//! the same `request_id` with a different payload is refused. Definite refusals
//! (out of stock, unknown SKU, …) are stored too, so a retry sees the same answer.
//!
//! The claim is an insert-if-absent that opens the transaction, so it is also
//! the first write: on SQLite it takes the write lock at once, and on PostgreSQL
//! a concurrent duplicate waits on the unique key until the first one commits,
//! then reads its reply.
//!
//! Every service has an `idempotency` table of this shape (see its migrations).

use prost::Message;
use sqlx::{AnyConnection, AnyPool, Row};
use tonic::{Code, Status};

use crate::{Error, error::DEFINITE_REFUSALS, time::now_ms};

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

/// Runs `effect` once for `key`: inside one transaction with the claim, or not
/// at all when the key was seen before (then the stored reply is returned).
///
/// `effect` returns the reply, or a `Status`: a definite refusal rolls the effect
/// back and is stored as the reply; any other error rolls back and stores nothing.
pub async fn run_once<Resp>(
    pool: &AnyPool,
    key: RequestKey<'_>,
    effect: impl AsyncFnOnce(&mut AnyConnection) -> Result<Resp, Status>,
) -> Result<Resp, Status>
where
    Resp: Message + Default,
{
    let mut tx = pool.begin().await.map_err(Error::from)?;
    let claimed = sqlx::query(
        "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (request_id) DO NOTHING",
    )
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
        drop(tx);
        return replay(pool, &key).await;
    }

    match effect(&mut tx).await {
        Ok(reply) => {
            sqlx::query("UPDATE idempotency SET status_code = 0, reply = $1 WHERE request_id = $2")
                .bind(reply.encode_to_vec())
                .bind(key.request_id)
                .execute(&mut *tx)
                .await
                .map_err(Error::from)?;
            tx.commit().await.map_err(Error::from)?;
            Ok(reply)
        }
        Err(status) => {
            // Undo any partial effect first (and free the connection).
            tx.rollback().await.map_err(Error::from)?;
            if DEFINITE_REFUSALS.contains(&status.code()) {
                record_refusal(pool, &key, &status).await
            } else {
                Err(status)
            }
        }
    }
}

/// Stores a definite refusal as the reply of `key`, unless a concurrent request
/// with the same key got there first; then its reply wins.
async fn record_refusal<Resp: Message + Default>(
    pool: &AnyPool,
    key: &RequestKey<'_>,
    status: &Status,
) -> Result<Resp, Status> {
    let stored = sqlx::query(
        "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, status_message) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(key.request_id)
    .bind(key.method)
    .bind(key.fingerprint.clone())
    .bind(now_ms())
    .bind(status.code() as i32 as i64)
    .bind(status.message())
    .execute(pool)
    .await
    .map_err(Error::from)?
    .rows_affected()
        == 1;
    if stored {
        Err(Status::new(status.code(), status.message()))
    } else {
        replay(pool, key).await
    }
}

/// Returns the stored reply of a `request_id` seen before.
async fn replay<Resp: Message + Default>(
    pool: &AnyPool,
    key: &RequestKey<'_>,
) -> Result<Resp, Status> {
    let row = sqlx::query(
        "SELECT method, fingerprint, status_code, status_message, reply FROM idempotency WHERE request_id = $1",
    )
    .bind(key.request_id)
    .fetch_one(pool)
    .await
    .map_err(Error::from)?;
    let method: String = row.try_get("method").map_err(Error::from)?;
    let fingerprint: Vec<u8> = row.try_get("fingerprint").map_err(Error::from)?;
    if method != key.method || fingerprint != key.fingerprint {
        return Err(Error::RequestIdReused {
            request_id: key.request_id.to_owned(),
            method,
        }
        .into());
    }
    let code: Option<i64> = row.try_get("status_code").map_err(Error::from)?;
    match code {
        Some(0) => {
            let reply: Vec<u8> = row.try_get("reply").map_err(Error::from)?;
            Resp::decode(reply.as_slice()).map_err(|e| {
                Error::Internal(format!("stored reply of {}: {e}", key.request_id)).into()
            })
        }
        Some(code) => {
            let message: Option<String> = row.try_get("status_message").map_err(Error::from)?;
            Err(Status::new(
                Code::from_i32(code as i32),
                message.unwrap_or_default(),
            ))
        }
        None => {
            Err(Error::Internal(format!("request {} has no stored reply", key.request_id)).into())
        }
    }
}
