//! With relaxed commits on PostgreSQL, a restart of the server halts the
//! log's writer.
//!
//! `synchronous_commit=off` acknowledges a commit before its WAL is flushed,
//! so a crash of the server can take back the last commits the writer was
//! told had succeeded. The drivers went on from them: a saga whose step
//! result was lost would write its next step on top of a log that no longer
//! holds the one before, and a compensation would not know of that step's
//! effect. Nothing in memory can be trusted after that, only the database:
//! the writer refuses every write from then on, and the engine reports
//! itself lost (`Engine::lost`), so that the process stops and its next
//! start recovers every saga from what the database kept.
//!
//! A restart is seen by the server's start time, read on every connection
//! the writer takes from its pool before it writes on it. A connection kept
//! from one commit to the next was read when it was taken, and one that
//! outlived a restart fails at its first statement, before anything is
//! written.

use std::sync::{Arc, Mutex};

use sqlx::AnyConnection;
use tokio::sync::watch;

/// The server's start time, as first seen, and the writer's halt.
pub(crate) struct ServerRestartGuard {
    started: Mutex<Option<String>>,
    halted: Arc<watch::Sender<Option<String>>>,
}

impl ServerRestartGuard {
    pub(crate) fn new(halted: Arc<watch::Sender<Option<String>>>) -> Self {
        ServerRestartGuard {
            started: Mutex::new(None),
            halted,
        }
    }

    /// Reads the server's start time on `conn`, a connection about to be
    /// written on. The first read is the reference; a later one that differs
    /// halts the writer, and every later call fails with the reason.
    pub(crate) async fn check(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        if let Some(reason) = self.halted.borrow().clone() {
            return Err(sqlx::Error::Protocol(reason));
        }
        let started: String = sqlx::query_scalar("SELECT pg_postmaster_start_time()::text")
            .fetch_one(&mut *conn)
            .await?;
        let mut seen = self.started.lock().unwrap();
        match seen.as_deref() {
            None => {
                *seen = Some(started);
                Ok(())
            }
            Some(first) if first == started => Ok(()),
            Some(first) => {
                let reason = format!(
                    "PostgreSQL restarted (started at {first}, now at {started}) while the saga \
                     log's commits were relaxed (DURABILITY=relaxed): its last commits may be lost, \
                     so nothing this process holds in memory can be trusted. It stops writing; \
                     restart it to recover every saga from the database"
                );
                tracing::error!("{reason}");
                self.halted.send_replace(Some(reason.clone()));
                Err(sqlx::Error::Protocol(reason))
            }
        }
    }

    /// The reason the writer halted, if it did.
    pub(crate) fn halted(&self) -> Option<String> {
        self.halted.borrow().clone()
    }
}
