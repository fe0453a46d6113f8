//! PostgreSQL: the saga steps' requests share commits (the shared
//! transaction), each still counts exactly once, and a stalled commit
//! holds nothing up for long.

use std::time::{Duration, Instant};

use ordersaga_tests::{Backend, TestDb};
use sqlx::AnyConnection;
use svc_kit::{
    idempotency::{RequestKey, run_once_batched},
    shared_transaction::{SharedTransaction, TurnResult},
    store::Store,
};

const REQUESTS: usize = 64;

/// 64 requests at once on one hot row: every effect lands once, their
/// replies come after a commit, and they needed far fewer commits than
/// requests (each committed alone before the shared transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_hot_row_share_commits_and_each_counts_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::open_with_batch_writer(&db.url, &stock_svc::MIGRATIONS)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO products (sku, name, unit_price_cents, currency, available, reserved, created_at_ms, updated_at_ms) \
         VALUES ('HOT', 'x', 1, 'EUR', 0, 0, 0, 0)",
    )
    .execute(&store.pool)
    .await
    .unwrap();
    let shared = store
        .shared
        .clone()
        .expect("PostgreSQL has a shared transaction");
    let before = shared.commits();
    let request = |i: usize| {
        let store = &store;
        async move {
            let request_id = format!("hot-{i}");
            let key = RequestKey {
                method: "Restock",
                request_id: &request_id,
                fingerprint: vec![1],
            };
            run_once_batched(
                store,
                key,
                async |conn: &mut AnyConnection| {
                    sqlx::query("UPDATE products SET available = available + 1 WHERE sku = 'HOT'")
                        .execute(conn)
                        .await
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    Ok(())
                },
                |_: &rusqlite::Connection| unreachable!("PostgreSQL"),
            )
            .await
        }
    };
    let replies = futures::future::join_all((0..REQUESTS).map(request)).await;
    for (i, reply) in replies.into_iter().enumerate() {
        reply.unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    let commits = shared.commits() - before;
    // Each again: replays, no second effect.
    for reply in futures::future::join_all((0..REQUESTS).map(request)).await {
        reply.unwrap();
    }
    let available: i64 = sqlx::query_scalar("SELECT available FROM products WHERE sku = 'HOT'")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(
        available, REQUESTS as i64,
        "each request's effect exactly once"
    );
    assert!(
        commits <= (REQUESTS / 2) as u64,
        "{REQUESTS} concurrent requests took {commits} commits: they did not share them"
    );
}

/// A `COMMIT` that does not answer (here a deferred trigger that sleeps at
/// commit time, as a stalled server would) fails its batch after the
/// timeout with UNAVAILABLE, and the requests after it are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_does_not_answer_fails_its_batch_and_holds_up_nothing_after_it() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::open(&db.url, &stock_svc::MIGRATIONS).await.unwrap();
    for statement in [
        "CREATE FUNCTION slow_commit() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(20); RETURN NULL; END $$ LANGUAGE plpgsql",
        "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON products DEFERRABLE INITIALLY DEFERRED \
         FOR EACH ROW WHEN (NEW.sku = 'SLOW') EXECUTE FUNCTION slow_commit()",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&store.pool)
            .await
            .unwrap();
    }
    let shared = SharedTransaction::new(store.pool.clone(), Duration::from_secs(2));
    let insert = |sku: &'static str| {
        let shared = &shared;
        async move {
            shared
                .run(async |conn: &mut AnyConnection| {
                    sqlx::query(
                        "INSERT INTO products (sku, name, unit_price_cents, currency, available, reserved, created_at_ms, updated_at_ms) \
                         VALUES ($1, 'x', 1, 'EUR', 1, 0, 0, 0)",
                    )
                    .bind(sku)
                    .execute(conn)
                    .await?;
                    Ok(TurnResult::Written(()))
                })
                .await
        }
    };
    let started = Instant::now();
    let slow = tokio::time::timeout(Duration::from_secs(10), insert("SLOW"))
        .await
        .expect("the stalled COMMIT held its request past 10 s");
    let err = tonic::Status::from(slow.expect_err("a COMMIT that did not answer succeeded"));
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // The next batch goes through on a connection of its own.
    tokio::time::timeout(Duration::from_secs(5), insert("FAST"))
        .await
        .expect("a request after the stalled COMMIT was held up")
        .unwrap();
}
