//! Connections kept out of the pool between uses, on PostgreSQL.
//!
//! sqlx pings a connection (a round trip) each time the pool hands it out
//! and again each time it comes back. The log's writer commits every few
//! milliseconds and a waiting `CreateOrder` reads its saga once: each use
//! cost two round trips besides its own statements. A kept connection is
//! used without a ping. If the server closed it meanwhile (a restart, an
//! administrator), its first statement fails at once and the work is made
//! again on a connection that answers a ping ([`Kept::again`]): a read
//! always, a log write only if it failed before anything that can write was
//! sent (see `writer::commit_kept`). One kept for longer than
//! [`KEEP_IDLE_FOR`] goes back to the pool when it is next taken (the pool
//! pings it), and a pool keeps at most a quarter of its connections out.

use std::{sync::Mutex, time::Duration};

/// `$work`, a read awaited with `$conn` bound to a `&mut AnyConnection`,
/// on a connection of `$kept` (a [`Kept`]), and once more if that
/// connection turned out closed: the steps of [`Kept::take`],
/// [`Kept::again`] and [`Kept::give_back`] in one place. Evaluates to the
/// work's `Result<_, sqlx::Error>`. (Not for writes: see
/// `writer::commit_kept`.)
macro_rules! on_kept {
    ($kept:expr, |$conn:ident| $work:expr) => {
        async {
            let kept: &$crate::log::kept::Kept = $kept;
            let mut taken = kept.take().await?;
            let mut result = {
                let $conn: &mut sqlx::AnyConnection = &mut taken.conn;
                $work.await
            };
            if kept.again(&mut taken, &result).await? {
                let $conn: &mut sqlx::AnyConnection = &mut taken.conn;
                result = $work.await;
            }
            kept.give_back(taken, result.is_ok());
            result
        }
    };
}
pub(crate) use on_kept;

use sqlx::{Any, AnyPool, Connection, pool::PoolConnection};
use tokio::time::Instant;

/// How long a connection may sit kept before it goes back to the pool.
const KEEP_IDLE_FOR: Duration = Duration::from_secs(1);

/// A connection taken for one piece of work.
pub(crate) struct Taken {
    pub(crate) conn: PoolConnection<Any>,
    /// Kept since an earlier use (so not pinged), rather than from the pool.
    pub(crate) kept: bool,
}

pub(crate) struct Kept {
    pool: AnyPool,
    /// At most this many are kept (0: none, for a pool that is not
    /// PostgreSQL's: SQLite in memory has one connection, not to be kept
    /// from everyone else).
    most: usize,
    idle: Mutex<Vec<(PoolConnection<Any>, Instant)>>,
}

impl Kept {
    pub(crate) fn new(pool: AnyPool, most: usize) -> Self {
        // Kept from the others, a pool's last connections could leave
        // nothing for them: a quarter at most.
        let room = pool.options().get_max_connections() as usize / 4;
        let most = if is_postgres(&pool) {
            most.min(room)
        } else {
            0
        };
        Kept {
            pool,
            most,
            idle: Mutex::new(Vec::with_capacity(most)),
        }
    }

    /// A kept connection, or one from the pool. The caller runs its work
    /// on it, then [`Kept::again`], then [`Kept::give_back`]. (A method
    /// taking the work as an async closure would be shorter, but its
    /// future could not be shown to be `Send`.)
    pub(crate) async fn take(&self) -> Result<Taken, sqlx::Error> {
        Ok(match self.take_kept() {
            Some(conn) => Taken { conn, kept: true },
            None => Taken {
                conn: self.pool.acquire().await?,
                kept: false,
            },
        })
    }

    /// Whether the work must be made again, on the connection from the
    /// pool that `taken` now holds: it failed because its kept connection
    /// had been closed.
    pub(crate) async fn again<T>(
        &self,
        taken: &mut Taken,
        result: &Result<T, sqlx::Error>,
    ) -> Result<bool, sqlx::Error> {
        let Err(err) = result else {
            return Ok(false);
        };
        if !taken.kept || !connection_lost(err) {
            return Ok(false);
        }
        tracing::info!(error = %err, "a kept connection was closed; the work goes on another");
        let fresh = self.answering().await?;
        let mut closed = std::mem::replace(&mut taken.conn, fresh);
        closed.close_on_drop();
        taken.kept = false;
        Ok(true)
    }

    /// A connection from the pool that answers a ping. After a kept one
    /// turned out closed, the pool's may be too (the server restarted), and
    /// the pool hands out unpinged those used within the last second.
    async fn answering(&self) -> Result<PoolConnection<Any>, sqlx::Error> {
        let mut closed = 0;
        loop {
            let mut conn = self.pool.acquire().await?;
            match conn.ping().await {
                Ok(()) => return Ok(conn),
                Err(err) if closed >= self.pool.options().get_max_connections() => return Err(err),
                Err(_) => {
                    conn.close_on_drop();
                    closed += 1;
                }
            }
        }
    }

    /// Keeps the connection after work that succeeded; closes it after work
    /// that failed (its state is unknown).
    pub(crate) fn give_back(&self, mut taken: Taken, succeeded: bool) {
        if self.most == 0 {
            return;
        }
        if !succeeded {
            taken.conn.close_on_drop();
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < self.most {
            idle.push((taken.conn, Instant::now()));
        }
    }

    /// The connection kept last, if it has not sat idle for too long (those
    /// that have go back to the pool).
    fn take_kept(&self) -> Option<PoolConnection<Any>> {
        let mut idle = self.idle.lock().unwrap();
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < KEEP_IDLE_FOR {
                return Some(conn);
            }
            // The others were kept before it: as stale.
            idle.clear();
            drop(conn);
        }
        None
    }
}

pub(crate) fn is_postgres(pool: &AnyPool) -> bool {
    pool.connect_options()
        .database_url
        .scheme()
        .starts_with("postgres")
}

/// Whether `err` says the connection is gone (closed by the server, or
/// cut), rather than that a statement failed on a live one.
fn connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // Class 08: connection exception; 57P: the server ended the session
        // (an administrator's command, a shutdown, a crash of another backend).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}
