//! A fresh store per test, with the engine's tables.

use sqlx::{AnyPool, any::AnyPoolOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh store; dropped with the value (the SQLite folder; PostgreSQL
/// databases are named by UUID and left for the server's owner to clean).
pub struct TestStore {
    pub pool: AnyPool,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL database and the server's admin URL, dropped with the store.
    database: Option<(String, String)>,
}

impl TestStore {
    /// Connections of this store's pool that have sat idle inside a
    /// transaction for 100 ms or more, as the server sees them (a live
    /// transaction between two statements does not count). Always 0 on
    /// SQLite, which has no server.
    pub async fn stranded_transactions(&self) -> i64 {
        use sqlx::{Connection, Row};
        let Some((name, admin_url)) = &self.database else {
            return 0;
        };
        let mut admin = sqlx::AnyConnection::connect(admin_url).await.unwrap();
        sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity \
             WHERE datname = $1 AND state LIKE 'idle in transaction%' \
             AND state_change < clock_timestamp() - interval '100 milliseconds'",
        )
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap()
        .get(0)
    }

    /// Ends every session of this store's database but the caller's own, as
    /// a restart of the server would, and waits until they are gone.
    /// Returns how many there were. (PostgreSQL only.)
    pub async fn end_sessions(&self) -> usize {
        use sqlx::Connection;
        let (name, admin_url) = self.database.as_ref().expect("a PostgreSQL store");
        let mut admin = sqlx::AnyConnection::connect(admin_url).await.unwrap();
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(name)
        .fetch_all(&mut admin)
        .await
        .unwrap();
        for _ in 0..250 {
            let left: i64 = sqlx::query_scalar(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity WHERE datname = $1",
            )
            .bind(name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
            if left == 0 {
                return ended.len();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the sessions of {name} did not end");
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let Some((name, admin_url)) = self.database.take() else {
            return;
        };
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::AnyConnection::connect(&admin_url).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
    }
}

pub async fn fresh(backend: Backend) -> TestStore {
    sqlx::any::install_default_drivers();
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}?mode=rwc", dir.path().join("saga.db").display());
            // One connection, as the services use SQLite.
            let pool = AnyPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .unwrap();
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .unwrap();
            saga_engine::MIGRATIONS_SQLITE.run(&pool).await.unwrap();
            TestStore {
                pool,
                _dir: Some(dir),
                database: None,
            }
        }
        Backend::Postgres => {
            let admin_url = std::env::var("TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let admin = AnyPoolOptions::new()
                .max_connections(1)
                .connect(&admin_url)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is unreachable: {e}"));
            let name = format!("engine_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            let (base, _) = admin_url.rsplit_once('/').unwrap();
            let pool = AnyPoolOptions::new()
                .max_connections(8)
                .connect(&format!("{base}/{name}"))
                .await
                .unwrap();
            saga_engine::MIGRATIONS_POSTGRES.run(&pool).await.unwrap();
            TestStore {
                pool,
                _dir: None,
                database: Some((name, admin_url)),
            }
        }
    }
}

/// A bare saga of kind `scripted`, RUNNING at step 0 under `local`, at the
/// first epoch: for tests that write its log directly.
pub async fn new_saga(pool: &AnyPool) -> uuid::Uuid {
    let saga = uuid::Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    saga_engine::log::insert_saga(
        &mut tx,
        &saga_engine::log::NewSaga {
            saga_id: saga,
            kind: "scripted",
            data_json: "{}".into(),
            trace_context: String::new(),
            starts_at_pivot: false,
            owner: "local".into(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    saga
}

/// `count` sagas as [`new_saga`] makes them.
pub async fn new_sagas(pool: &AnyPool, count: usize) -> Vec<uuid::Uuid> {
    let mut sagas = Vec::with_capacity(count);
    for _ in 0..count {
        sagas.push(new_saga(pool).await);
    }
    sagas
}
