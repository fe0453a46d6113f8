//! The orchestrator creates the saga engine's tables through its own migration
//! history (it predates the engine's crate). This checks that the two never
//! drift: the same columns, with the same types, and the same indexes, on
//! both stores, and on PostgreSQL the same storage options (the log's
//! fillfactor).

use ordersaga_tests::{Backend, TestDb};
use sqlx::AnyPool;

on_both_stores!(the_orchestrator_and_the_engine_create_the_same_engine_tables);

/// (column, type) of `table`, in column order.
async fn columns(pool: &AnyPool, backend: Backend, table: &str) -> Vec<(String, String)> {
    let sql = match backend {
        Backend::Sqlite => {
            format!("SELECT name, type FROM pragma_table_info('{table}') ORDER BY cid")
        }
        Backend::Postgres => format!(
            "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns \
             WHERE table_name = '{table}' AND table_schema = 'public' ORDER BY ordinal_position"
        ),
    };
    let mut columns: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap();
    // ALTER TABLE appends a column; compare as sets of (name, type).
    columns.sort();
    if backend == Backend::Postgres {
        let options: String = sqlx::query_scalar(
            "SELECT COALESCE(array_to_string(reloptions, ','), '') FROM pg_class WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap();
        columns.push(("(storage options)".into(), options));
    }
    columns
}

/// (name, definition) of every index on `table` (SQLite's own, for keys
/// and UNIQUE, have no definition), by name.
async fn indexes(pool: &AnyPool, backend: Backend, table: &str) -> Vec<(String, String)> {
    let sql = match backend {
        Backend::Sqlite => format!(
            "SELECT name, COALESCE(sql, '') FROM sqlite_master \
             WHERE type = 'index' AND tbl_name = '{table}' ORDER BY name"
        ),
        Backend::Postgres => format!(
            "SELECT indexname::TEXT, indexdef FROM pg_indexes \
             WHERE tablename = '{table}' AND schemaname = 'public' ORDER BY indexname"
        ),
    };
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn the_orchestrator_and_the_engine_create_the_same_engine_tables(backend: Backend) {
    let by_orchestrator = TestDb::new(backend).await;
    svc_kit::store::Store::open(
        &by_orchestrator.url,
        &orchestrator::MIGRATIONS,
        Default::default(),
    )
    .await
    .unwrap();
    let by_engine = TestDb::new(backend).await;
    let engine_migrations = svc_kit::store::Migrations {
        sqlite: &saga_engine::MIGRATIONS_SQLITE,
        postgres: &saga_engine::MIGRATIONS_POSTGRES,
    };
    let engine_pool =
        svc_kit::store::Store::open(&by_engine.url, &engine_migrations, Default::default())
            .await
            .unwrap()
            .pool;
    let orchestrator_pool = by_orchestrator.pool().await;
    for table in [
        "sagas",
        "saga_steps",
        "outbox",
        "saga_actions",
        "saga_attempts",
    ] {
        let expected = columns(&engine_pool, backend, table).await;
        assert!(!expected.is_empty(), "{table} exists");
        assert_eq!(
            columns(&orchestrator_pool, backend, table).await,
            expected,
            "{table} differs between the orchestrator's and the engine's migrations"
        );
        assert_eq!(
            indexes(&orchestrator_pool, backend, table).await,
            indexes(&engine_pool, backend, table).await,
            "{table}'s indexes differ between the orchestrator's and the engine's migrations"
        );
    }

    if backend == Backend::Postgres {
        // Updated in place at every checkpoint: room left on each page.
        for table in ["sagas", "saga_steps"] {
            let options = columns(&engine_pool, backend, table).await;
            assert_eq!(
                options.last().map(|(_, o)| o.as_str()),
                Some("fillfactor=70"),
                "{table}'s storage options"
            );
        }
        // The relaxed log writer's marks: the same table in both, unlogged
        // (emptied by a crash recovery, which is the point).
        let table = "saga_log_marks";
        let expected = columns(&engine_pool, backend, table).await;
        assert_eq!(columns(&orchestrator_pool, backend, table).await, expected);
        assert_eq!(
            indexes(&orchestrator_pool, backend, table).await,
            indexes(&engine_pool, backend, table).await
        );
        for pool in [&orchestrator_pool, &engine_pool] {
            let persistence: String = sqlx::query_scalar(
                "SELECT relpersistence::TEXT FROM pg_class WHERE relname = 'saga_log_marks'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(persistence, "u", "saga_log_marks is unlogged");
        }
    }
}
