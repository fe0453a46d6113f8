//! `DURABILITY`: what a service's commits wait for. `full` (the default)
//! waits for the disk; `relaxed` only for the operating system or the
//! PostgreSQL server. Checked on each connection a service's store commits
//! through: the pool's and, on SQLite, the batch writer's. (What relaxed
//! commits survive is tested by the chaos runner, `chaos.rs`.)

use ordersaga_tests::{Backend, TestDb};
use svc_kit::{batch_writer::Outcome, durability::Durability, store::Store};

on_both_stores!(each_connection_of_a_store_commits_as_its_durability_says);

/// What the pool's connections and the batch writer's wait for, as the
/// database names it: SQLite's `synchronous` level (1 NORMAL, 2 FULL), or
/// PostgreSQL's `synchronous_commit`.
async fn commit_settings(store: &Store) -> (String, Option<String>) {
    let pool = match store.backend {
        svc_kit::store::Backend::Sqlite => sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
            .fetch_one(&store.pool)
            .await
            .unwrap()
            .to_string(),
        svc_kit::store::Backend::Postgres => sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&store.pool)
            .await
            .unwrap(),
    };
    let writer = match &store.writer {
        Some(writer) => Some(
            writer
                .run(|conn| {
                    let level: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                    Ok(Outcome::Keep(level.to_string()))
                })
                .await
                .unwrap(),
        ),
        None => None,
    };
    (pool, writer)
}

async fn each_connection_of_a_store_commits_as_its_durability_says(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut seen = vec![];
    for durability in [Durability::Full, Durability::Relaxed] {
        let store = Store::open_with_batch_writer(&db.url, &stock_svc::MIGRATIONS, durability)
            .await
            .unwrap();
        seen.push(commit_settings(&store).await);
        store.pool.close().await;
    }
    let expected = match backend {
        Backend::Sqlite => [
            ("2".to_owned(), Some("2".to_owned())),
            ("1".to_owned(), Some("1".to_owned())),
        ],
        // `full` leaves the server's setting (`on` here), relaxed turns it off.
        Backend::Postgres => [("on".to_owned(), None), ("off".to_owned(), None)],
    };
    assert_eq!(seen, expected);
}
