//! Several engines on one PostgreSQL database: who drives which saga.
//!
//! Each saga row names its `owner`, the replica that drives it, and an
//! `epoch` that grows by one each time the saga changes hands. A replica
//! holds a lease on itself, a row in `saga_replicas` that it renews; the
//! sagas of a replica whose lease ran out are claimed by the others, each
//! claim bumping the epoch. Every write a driver makes is conditional on the
//! epoch it claimed (see [`crate::log`]), so a replica that was paused, cut off
//! or slow past its lease can no longer write to the sagas it lost, whatever
//! it believes: the fence is in the database, not in its clock.
//!
//! The lease times are the database's clock, so the replicas' own clocks
//! never have to agree.
//!
//! Why per-saga ownership with per-replica leases, rather than leases on a
//! fixed set of shards: see ARCHITECTURE.md ("Replicas").

use std::time::Duration;

use sqlx::{AnyPool, Row};
use uuid::Uuid;

/// One replica among several on one PostgreSQL database.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// Unique among the live replicas. A replica that restarts under the
    /// same ID takes its sagas back at once, without waiting for its lease.
    pub id: String,
    /// How long a replica's sagas stay its own after its last renewal.
    pub lease: Duration,
    /// The database's URL, for the connection that listens for changes.
    pub database_url: String,
}

impl ReplicaSettings {
    /// How often the lease is renewed and orphaned sagas are looked for: a
    /// fifth of the lease, so four renewals can fail before it runs out.
    pub fn tick(&self) -> Duration {
        (self.lease / 5).max(Duration::from_millis(20))
    }
}

/// Now, on the database's clock, in Unix milliseconds.
const NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

const OPEN: &str = "status IN ('RUNNING', 'COMPENSATING')";

/// Whether the replica named by `owner` holds no live lease.
fn orphaned(owner: &str) -> String {
    format!(
        "NOT EXISTS (SELECT 1 FROM saga_replicas r WHERE r.replica_id = {owner} AND r.lease_until_ms > {NOW_MS})"
    )
}

/// Another incarnation's lease under the same ID, if it is still live.
pub(crate) async fn live_predecessor(
    pool: &AnyPool,
    replica: &ReplicaSettings,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT lease_until_ms - {NOW_MS} FROM saga_replicas \
         WHERE replica_id = $1 AND lease_until_ms > {NOW_MS}"
    )))
    .bind(&replica.id)
    .fetch_optional(pool)
    .await
}

/// Registers this incarnation with a fresh lease, replacing any earlier one
/// under the same ID.
pub(crate) async fn register(
    pool: &AnyPool,
    replica: &ReplicaSettings,
    incarnation: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO saga_replicas (replica_id, incarnation, lease_until_ms, started_at_ms) \
         VALUES ($1, $2, {NOW_MS} + $3, {NOW_MS}) \
         ON CONFLICT (replica_id) DO UPDATE SET incarnation = excluded.incarnation, \
           lease_until_ms = excluded.lease_until_ms, started_at_ms = excluded.started_at_ms"
    )))
    .bind(&replica.id)
    .bind(incarnation.to_string())
    .bind(replica.lease.as_millis() as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    Renewed,
    /// Another process registered under this ID since: this one must stop.
    Superseded,
}

pub(crate) async fn renew(
    pool: &AnyPool,
    replica: &ReplicaSettings,
    incarnation: Uuid,
) -> Result<Renewal, sqlx::Error> {
    let renewed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE saga_replicas SET lease_until_ms = {NOW_MS} + $3 \
         WHERE replica_id = $1 AND incarnation = $2"
    )))
    .bind(&replica.id)
    .bind(incarnation.to_string())
    .bind(replica.lease.as_millis() as i64)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(if renewed == 1 {
        Renewal::Renewed
    } else {
        Renewal::Superseded
    })
}

/// Gives up every open saga this replica owns (a later epoch fences any
/// driver still running here) and ends its lease, so that the others take
/// them at once. Returns how many sagas it gave up.
pub(crate) async fn release(
    pool: &AnyPool,
    replica: &ReplicaSettings,
    incarnation: Uuid,
    kind: &str,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let released = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE sagas SET owner = '', epoch = epoch + 1 WHERE owner = $1 AND kind = $2 AND {OPEN}"
    )))
    .bind(&replica.id)
    .bind(kind)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM saga_replicas WHERE replica_id = $1 AND incarnation = $2")
        .bind(&replica.id)
        .bind(incarnation.to_string())
        .execute(&mut *tx)
        .await?;
    crate::notifications::announce_release(&mut tx, incarnation).await?;
    tx.commit().await?;
    Ok(released)
}

/// Claims every open saga this replica owns (after a restart under the same
/// ID): each moves to a new epoch, which fences an earlier incarnation.
pub(crate) async fn claim_own(
    pool: &AnyPool,
    replica: &ReplicaSettings,
    kind: &str,
) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE sagas SET epoch = epoch + 1 WHERE owner = $1 AND kind = $2 AND {OPEN} \
         RETURNING saga_id, epoch"
    )))
    .bind(&replica.id)
    .bind(kind)
    .fetch_all(pool)
    .await?;
    claimed(&rows)
}

/// Claims up to `limit` open sagas whose owner holds no live lease (it died,
/// or handed them over on shutdown). Rows another replica is claiming at the
/// same moment are skipped, not waited for.
pub(crate) async fn claim_orphans(
    pool: &AnyPool,
    replica: &ReplicaSettings,
    kind: &str,
    limit: i64,
) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE sagas SET owner = $1, epoch = epoch + 1 WHERE saga_id IN ( \
           SELECT s.saga_id FROM sagas s \
           WHERE s.kind = $2 AND s.{OPEN} AND s.owner <> $1 AND {} \
           ORDER BY s.created_at_ms LIMIT $3 FOR UPDATE SKIP LOCKED) \
         RETURNING saga_id, epoch",
        orphaned("s.owner")
    )))
    .bind(&replica.id)
    .bind(kind)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    claimed(&rows)
}

/// Claims one open saga if this replica owns it or its owner holds no live
/// lease. Returns the new epoch, or `None` if a live replica drives it (or it
/// is not open).
pub(crate) async fn claim_one(
    pool: &AnyPool,
    replica: &ReplicaSettings,
    kind: &str,
    saga_id: Uuid,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "UPDATE sagas SET owner = $1, epoch = epoch + 1 \
         WHERE saga_id = $2 AND kind = $3 AND {OPEN} AND (owner = $1 OR {}) \
         RETURNING epoch",
        orphaned("sagas.owner")
    )))
    .bind(&replica.id)
    .bind(saga_id.to_string())
    .bind(kind)
    .fetch_optional(pool)
    .await
}

/// Open sagas this replica owns that have not moved for a lease: candidates
/// for a saga nothing here drives (its start's reply was lost and it could
/// not be read back, say).
pub(crate) async fn own_idle(
    pool: &AnyPool,
    replica: &ReplicaSettings,
    kind: &str,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT saga_id FROM sagas WHERE owner = $1 AND kind = $2 AND {OPEN} \
         AND updated_at_ms < {NOW_MS} - $3"
    )))
    .bind(&replica.id)
    .bind(kind)
    .bind(replica.lease.as_millis() as i64)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            let id: String = row.try_get("saga_id")?;
            Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        })
        .collect()
}

fn claimed(rows: &[sqlx::any::AnyRow]) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    rows.iter()
        .map(|row| {
            let id: String = row.try_get("saga_id")?;
            let id = Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            Ok((id, row.try_get("epoch")?))
        })
        .collect()
}
