//! Which replica publishes the outbox.
//!
//! Every replica runs a relay, but only one publishes at a time: two relays
//! each taking a share of the outbox would publish one order's events out of
//! order. The leader holds a PostgreSQL advisory lock on a connection of its
//! own. A leader that dies or is cut off loses the lock with its session: at
//! once when its connection closes (a crash), and within the lease when it
//! goes silent (a pause or a partition), because the session is opened with
//! `idle_session_timeout` set to the lease, and the leader touches it before
//! every round. Another replica's relay then takes the lock and publishes from
//! the oldest unsent event, so each order's events still go out in order.
//!
//! The window that is left: a leader paused in the middle of a round may,
//! when it wakes, finish that round after its successor published the same
//! events. Those are duplicates, which the at-least-once delivery already
//! allows (consumers dedupe by `message_id`); the first delivery of each
//! event is still in order.

use std::time::Duration;

use sqlx::{
    ConnectOptions, Connection,
    postgres::{PgConnectOptions, PgConnection},
};

/// The advisory lock's key ("ordersr1"); one per database.
const LOCK_KEY: i64 = 0x6f72_6465_7273_7231;

pub struct RelayLeader {
    /// `None` alone on its store: always the leader.
    election: Option<Election>,
}

struct Election {
    url: String,
    /// Names the session (`application_name`), so an operator sees in
    /// `pg_stat_activity` which replica leads.
    replica_id: String,
    lease: Duration,
    /// The session that holds the lock, while this replica leads.
    held: Option<PgConnection>,
}

impl RelayLeader {
    /// The only relay on its store.
    pub fn alone() -> Self {
        RelayLeader { election: None }
    }

    /// One relay among the replicas on the PostgreSQL database at `url`.
    pub fn elected(url: &str, replica_id: &str, lease: Duration) -> Self {
        RelayLeader {
            election: Some(Election {
                url: url.to_owned(),
                replica_id: replica_id.to_owned(),
                lease,
                held: None,
            }),
        }
    }

    /// Whether this relay may publish now: it keeps the lead it holds (and
    /// proves its session is alive), or takes it if nobody holds it.
    pub async fn lead(&mut self) -> bool {
        let Some(election) = &mut self.election else {
            return true;
        };
        if let Some(conn) = &mut election.held {
            match sqlx::query("SELECT 1").execute(&mut *conn).await {
                Ok(_) => return true,
                Err(err) => {
                    tracing::warn!(error = %err, "lost the outbox relay's lead; another replica takes it");
                    election.held = None;
                }
            }
        }
        match try_lead(election).await {
            Ok(Some(conn)) => {
                tracing::info!("this replica publishes the outbox");
                election.held = Some(conn);
                true
            }
            Ok(None) => false,
            Err(err) => {
                tracing::debug!(error = %err, "cannot run for the outbox relay's lead");
                false
            }
        }
    }

    /// Gives the lead up at once (on shutdown), rather than when the session
    /// times out.
    pub async fn resign(&mut self) {
        if let Some(conn) = self.election.as_mut().and_then(|e| e.held.take()) {
            let _ = conn.close().await;
        }
    }
}

/// The session name of the replica that leads the relay.
pub fn session_name(replica_id: &str) -> String {
    format!("outbox-relay {replica_id}")
}

async fn try_lead(election: &Election) -> Result<Option<PgConnection>, sqlx::Error> {
    let options: PgConnectOptions = election.url.parse()?;
    let mut conn = options
        .application_name(&session_name(&election.replica_id))
        .connect()
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET idle_session_timeout = {}",
        election.lease.as_millis()
    )))
    .execute(&mut conn)
    .await?;
    let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await?;
    if won {
        Ok(Some(conn))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}
