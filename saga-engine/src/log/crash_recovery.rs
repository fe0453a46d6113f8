//! With relaxed commits on PostgreSQL, a crash recovery of the server halts
//! the log's writer.
//!
//! `synchronous_commit=off` acknowledges a commit before its WAL is flushed,
//! so a crash of the server (of the whole server, or of one backend, after
//! which PostgreSQL ends every session and recovers) can take back the last
//! commits the writer was told had succeeded. The drivers went on from
//! them: a saga whose step result was lost would write its next step on top
//! of a log that no longer holds the one before, and a compensation would
//! not know of that step's effect. Nothing in memory can be trusted after
//! that, only the database: the writer refuses every write from then on,
//! and the engine reports itself lost (`Engine::lost`), so that the process
//! stops and its next start recovers every saga from what the database kept.
//!
//! A crash recovery is seen by a mark in an unlogged table
//! (`saga_log_marks`): PostgreSQL empties unlogged tables whenever it
//! recovers from a crash, and they are empty on a standby promoted after a
//! failover, while a clean restart (which flushes the WAL first, losing
//! nothing) keeps them. The writer leaves its mark before the engine reads
//! the log at start-up (`LogWriter::arm`), and looks for it on every later
//! connection it takes from its pool, before writing on it. A connection kept from one commit to the
//! next was checked when it was taken, and one that outlived a crash
//! recovery fails at its first statement, before anything is written. (A
//! pooler in transaction mode, which would hand the writer one server
//! connection after another under one client connection, is not supported:
//! the writer's sessions also carry settings of their own.)

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use sqlx::AnyConnection;
use tokio::sync::watch;
use uuid::Uuid;

use crate::now_ms;

/// This writer's mark, once written, and the writer's halt.
pub(crate) struct CrashRecoveryGuard {
    mark: String,
    /// The writer is one task, which checks one connection at a time.
    written: AtomicBool,
    halted: Arc<watch::Sender<Option<String>>>,
}

impl CrashRecoveryGuard {
    pub(crate) fn new(halted: Arc<watch::Sender<Option<String>>>) -> Self {
        CrashRecoveryGuard {
            mark: Uuid::new_v4().to_string(),
            written: AtomicBool::new(false),
            halted,
        }
    }

    /// On `conn`, a connection about to be written on: writes this writer's
    /// mark the first time; afterwards, looks for it. A mark gone means the
    /// server recovered from a crash since: the writer halts, and every later
    /// call fails with the reason.
    pub(crate) async fn check(&self, conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
        if let Some(reason) = self.halted() {
            return Err(sqlx::Error::Protocol(reason));
        }
        if !self.written.load(Ordering::Acquire) {
            // A first insert whose reply was lost may have committed: the
            // second finds its own mark, which is as good.
            sqlx::query(
                "INSERT INTO saga_log_marks (mark, written_at_ms) VALUES ($1, $2) \
                 ON CONFLICT (mark) DO NOTHING",
            )
            .bind(&self.mark)
            .bind(now_ms())
            .execute(&mut *conn)
            .await?;
            self.written.store(true, Ordering::Release);
            return Ok(());
        }
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM saga_log_marks WHERE mark = $1")
            .bind(&self.mark)
            .fetch_optional(&mut *conn)
            .await?;
        if found.is_some() {
            return Ok(());
        }
        let reason = "PostgreSQL recovered from a crash (or a standby took over) while the saga \
                      log's commits were relaxed (DURABILITY=relaxed): its last commits may be \
                      lost, so nothing this process holds in memory can be trusted. It stops \
                      writing; restart it to recover every saga from the database"
            .to_owned();
        tracing::error!("{reason}");
        self.halted.send_replace(Some(reason.clone()));
        Err(sqlx::Error::Protocol(reason))
    }

    /// The reason the writer halted, if it did.
    pub(crate) fn halted(&self) -> Option<String> {
        self.halted.borrow().clone()
    }
}
