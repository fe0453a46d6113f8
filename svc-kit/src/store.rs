//! One store, two backends: a SQLite file (the embedded default) or PostgreSQL.
//!
//! Both go through sqlx's `Any` driver, so every query is written once with `$n`
//! placeholders and only the migrations differ per backend.

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, bail};
use sqlx::{AnyPool, Connection, any::AnyPoolOptions, migrate::Migrator};

use crate::{
    batch_writer::{BatchWriter, WriteGate},
    durability::Durability,
    shared_transaction::{self, SharedTransaction},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl FromStr for Backend {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            bail!(
                "DATABASE_URL must start with sqlite:// or postgres://, got {:?}",
                redact(url)
            )
        }
    }
}

/// How long PostgreSQL lets a session sit idle inside a transaction.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "SET idle_in_transaction_session_timeout = 3000";

/// A pooled PostgreSQL connection idle for this long is pinged before use.
pub const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// The migrations of a service, one folder per backend.
pub struct Migrations {
    pub sqlite: &'static Migrator,
    pub postgres: &'static Migrator,
}

#[derive(Clone)]
pub struct Store {
    pub pool: AnyPool,
    pub backend: Backend,
    /// On a SQLite file: the thread that runs the hot writes in batches
    /// (see [`crate::batch_writer`]). `None` on PostgreSQL and in memory.
    pub writer: Option<BatchWriter>,
    /// On PostgreSQL: the transaction the hot writes share, one commit per
    /// batch (see [`crate::shared_transaction`]).
    pub shared: Option<SharedTransaction>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("batch_writer", &self.writer.is_some())
            .field("shared_transaction", &self.shared.is_some())
            .finish()
    }
}

impl Store {
    /// Connects, creating a SQLite file (and its folder) when missing, and runs
    /// the service's migrations. No batch writer: for a store whose writes go
    /// elsewhere (the orchestrator's, written by the saga engine's own writer).
    /// Its commits wait for the disk as `durability` says.
    pub async fn open(
        url: &str,
        migrations: &Migrations,
        durability: Durability,
    ) -> anyhow::Result<Store> {
        Self::connect(url, migrations, durability, false).await
    }

    /// [`Store::open`], and on a SQLite file the batch writer that runs the
    /// service's hot writes ([`crate::batch_writer`]).
    pub async fn open_with_batch_writer(
        url: &str,
        migrations: &Migrations,
        durability: Durability,
    ) -> anyhow::Result<Store> {
        Self::connect(url, migrations, durability, true).await
    }

    async fn connect(
        url: &str,
        migrations: &Migrations,
        durability: Durability,
        batch_writer: bool,
    ) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let backend: Backend = url.parse()?;
        let (url, file) = match backend {
            Backend::Sqlite => {
                let (url, file) = prepare_sqlite_url(url)?;
                (url, Some(file))
            }
            Backend::Postgres => {
                check_postgres_tls_files(url)?;
                (url.to_owned(), None)
            }
        };
        // While the database is down, sqlx retries its connects with a backoff
        // capped at a fifth of this timeout: 10 s let a connection come back up
        // to 2 s after PostgreSQL did (see docs/reliability.md). A caller that
        // times out gets UNAVAILABLE and retries.
        let options = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(3));
        let options = match backend {
            // One connection: SQLite allows one writer at a time anyway, and a pool
            // queue is fair where SQLite's busy handler sleeps and polls (and can
            // fail with SQLITE_BUSY under load). No transaction is held across an RPC.
            // `synchronous` is a setting of the connection, not of the file:
            // set on each one the pool opens.
            Backend::Sqlite => options.max_connections(1).after_connect(move |conn, _| {
                Box::pin(async move {
                    let pragma =
                        format!("PRAGMA synchronous = {}", durability.sqlite_synchronous());
                    sqlx::query(sqlx::AssertSqlSafe(pragma))
                        .execute(conn)
                        .await
                        .map(|_| ())
                })
            }),
            // A transaction is never left open across anything slow (no RPC
            // inside one), so one idle in the middle means its process is
            // stuck: paused, swapped out, partitioned. Its row locks would
            // block everyone else, a replica's successors included, for as
            // long as that lasts; PostgreSQL ends such a session instead.
            Backend::Postgres => options
                .max_connections(16)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        sqlx::query(IDLE_IN_TRANSACTION_TIMEOUT)
                            .execute(&mut *conn)
                            .await?;
                        if let Some(setting) = durability.postgres_session_setting() {
                            sqlx::query(setting).execute(&mut *conn).await?;
                        }
                        Ok(())
                    })
                })
                // sqlx pings every connection it hands out (a round trip)
                // by default. One given back a moment ago was pinged then
                // (sqlx pings on every return) and is alive: only one that
                // sat idle for a while, long enough for the server to have
                // gone away, is pinged before use.
                .test_before_acquire(false)
                .before_acquire(|conn, meta| {
                    Box::pin(async move {
                        if meta.idle_for >= PING_WHEN_IDLE_FOR {
                            conn.ping().await?;
                        }
                        Ok(true)
                    })
                }),
        };
        let pool = options
            .connect(&url)
            .await
            .with_context(|| format!("cannot open the store at {}", redact(&url)))?;
        if backend == Backend::Sqlite {
            // WAL lets readers run beside the writer; with `synchronous=FULL`
            // (the default durability) a commit is on disk before its reply
            // is sent.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .context("cannot switch SQLite to WAL mode")?;
        }
        let migrator = match backend {
            Backend::Sqlite => migrations.sqlite,
            Backend::Postgres => migrations.postgres,
        };
        migrator
            .run(&pool)
            .await
            .with_context(|| format!("cannot migrate the store at {}", redact(&url)))?;
        let writer = file
            .filter(|_| batch_writer)
            .map(|file| BatchWriter::open(&file, WriteGate::default(), durability))
            .transpose()?;
        let shared = (backend == Backend::Postgres && batch_writer)
            .then(|| SharedTransaction::new(pool.clone(), shared_transaction::COMMIT_TIMEOUT));
        Ok(Store {
            pool,
            backend,
            writer,
            shared,
        })
    }
}

impl Store {
    /// **Benchmarks only: nothing survives a restart.** A SQLite database in
    /// memory, on one connection that is never closed (closing it would drop
    /// the data). It measures the engine without the disk: the durability
    /// ceiling. Never the default; the orchestrator exposes it only behind
    /// `--bench-only-in-memory-store`.
    pub async fn open_in_memory_for_benchmarks(migrations: &Migrations) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect("sqlite::memory:")
            .await
            .context("cannot open an in-memory SQLite store")?;
        migrations
            .sqlite
            .run(&pool)
            .await
            .context("cannot migrate the in-memory store")?;
        Ok(Store {
            pool,
            backend: Backend::Sqlite,
            writer: None,
            shared: None,
        })
    }
}

/// Adds `mode=rwc` so a missing file is created, and creates the parent
/// folder. Returns the URL and the file's path.
fn prepare_sqlite_url(url: &str) -> anyhow::Result<(String, PathBuf)> {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" {
        bail!(
            "DATABASE_URL: an in-memory SQLite store would lose every order on restart; give a file path"
        );
    }
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the data folder {}", parent.display()))?;
    }
    let query = if query.contains("mode=") {
        query.to_owned()
    } else if query.is_empty() {
        "mode=rwc".to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok((format!("sqlite://{path}?{query}"), PathBuf::from(path)))
}

/// TLS to PostgreSQL is set in the URL as libpq sets it (`sslmode=verify-full`,
/// `sslrootcert`, `sslcert`, `sslkey`). Their files are checked now, so that a
/// wrong path stops the start-up naming the parameter, not a connect later.
fn check_postgres_tls_files(url: &str) -> anyhow::Result<()> {
    let Ok(parsed) = url::Url::parse(url) else {
        // sqlx reports a malformed URL when it connects.
        return Ok(());
    };
    for (name, path) in parsed.query_pairs() {
        if !matches!(&*name, "sslrootcert" | "sslcert" | "sslkey") || path == "system" {
            continue;
        }
        std::fs::File::open(&*path).with_context(|| {
            format!("DATABASE_URL: {name}={path} cannot be read (a PEM file is expected)")
        })?;
    }
    Ok(())
}

/// Hides a password in a URL before it reaches a message or a log.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_an_unreadable_tls_file_of_the_database_url() {
        let err = check_postgres_tls_files(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/no/such%20dir/ca.pem",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("sslrootcert=/no/such dir/ca.pem cannot be read"),
            "{err}"
        );
        assert!(check_postgres_tls_files("postgres://u@h/db?sslmode=require").is_ok());
        assert!(check_postgres_tls_files("postgres://u@h/db?sslrootcert=system").is_ok());
    }

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://data/x.db"), "sqlite://data/x.db");
    }

    #[test]
    fn refuses_unknown_scheme_and_memory() {
        assert!("mysql://x".parse::<Backend>().is_err());
        assert!(prepare_sqlite_url("sqlite::memory:").is_err());
    }
}
