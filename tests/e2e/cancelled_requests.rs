//! A request whose caller leaves (a client that resets its stream, a deadline
//! that passes) is dropped by tonic wherever it is, in the middle of a
//! `BEGIN` included. Whatever point it is dropped at, no pooled connection may
//! be left inside a transaction: later work on it would never commit, and the
//! locks it holds would block every retry of the same request.
//! (sqlx 0.9 hands back a connection whose `BEGIN` was cancelled in flight
//! still inside the transaction.)

use std::time::Duration;

use ordersaga_tests::{Backend, TestDb};
use sqlx::{AnyConnection, Connection, Row};
use svc_kit::{
    idempotency::{Refusal, RequestKey, run_once, run_once_batched},
    store::Store,
};

on_both_stores!(
    a_request_dropped_at_any_await_leaves_no_transaction_open,
    a_hot_request_dropped_at_any_await_leaves_no_transaction_open,
);
// SQLite only: on PostgreSQL no gate stands between the pool and the hot
// writes (row locks do the work).

const REQUESTS: usize = 40;

const INSERT_PRODUCT: &str = "INSERT INTO products (sku, name, unit_price_cents, currency, available, reserved, created_at_ms, updated_at_ms) \
     VALUES ($1, 'x', 1, 'EUR', 1, 0, 0, 0)";

/// An admin request: its own transaction from the pool.
async fn a_request_dropped_at_any_await_leaves_no_transaction_open(backend: Backend) {
    dropped_at_any_await(backend, false).await
}

/// A saga step's request: on PostgreSQL, a turn on the shared transaction
/// (a drop mid-turn rolls its whole batch back); on SQLite, the batch writer.
async fn a_hot_request_dropped_at_any_await_leaves_no_transaction_open(backend: Backend) {
    dropped_at_any_await(backend, true).await
}

async fn dropped_at_any_await(backend: Backend, hot: bool) {
    let db = TestDb::new(backend).await;
    let store = if hot {
        Store::open_with_batch_writer(&db.url, &stock_svc::MIGRATIONS, Default::default()).await
    } else {
        Store::open(&db.url, &stock_svc::MIGRATIONS, Default::default()).await
    }
    .unwrap();
    let request = |i: usize| {
        let request_id = format!("dropped-{i}");
        let store = &store;
        async move {
            let key = RequestKey {
                method: "Restock",
                request_id: &request_id,
                fingerprint: vec![1],
            };
            let effect = async |conn: &mut AnyConnection| {
                sqlx::query(INSERT_PRODUCT)
                    .bind(&request_id)
                    .execute(conn)
                    .await
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                Ok(())
            };
            if !hot {
                return run_once(store, key, effect).await;
            }
            let sku = request_id.clone();
            run_once_batched(
                store,
                key,
                Refusal::MayWrite,
                effect,
                move |conn: &rusqlite::Connection| {
                    conn.execute(INSERT_PRODUCT, [&sku])
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    Ok(())
                },
            )
            .await
        }
    };

    let mut other = AnyConnection::connect(&db.url).await.unwrap();
    let visible = async |other: &mut AnyConnection, sku: &str| -> bool {
        sqlx::query("SELECT sku FROM products WHERE sku = $1")
            .bind(sku)
            .fetch_optional(other)
            .await
            .unwrap()
            .is_some()
    };

    // Request i is polled i times, the reactor running between polls, then
    // dropped: every await point of the request is a place it dies at.
    for i in 0..REQUESTS {
        let mut call = Box::pin(request(i));
        for _ in 0..i {
            if futures::poll!(call.as_mut()).is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        drop(call);
        // The dropped request's connection goes back to the pool (or, on the
        // shared transaction, its batch is rolled back) on a task of its own:
        // give it the time, then look. Well under the server's own 3 s limit
        // on a session idle in a transaction, which would hide a stranded one.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if backend == Backend::Postgres {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                let stranded: i64 = sqlx::query(
                    "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity \
                     WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
                )
                .fetch_one(&mut other)
                .await
                .unwrap()
                .get(0);
                if stranded == 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "after request {i} was dropped, a pooled connection sat idle inside a transaction for 1 s"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // A statement outside any transaction, on the pool: committed as
        // soon as it returns, for everyone to see.
        let sku = format!("after-drop-{i}");
        sqlx::query(INSERT_PRODUCT)
            .bind(&sku)
            .execute(&store.pool)
            .await
            .unwrap();
        assert!(
            visible(&mut other, &sku).await,
            "a statement after request {i} was dropped did not commit: its connection was left inside a transaction"
        );
    }

    // Each again, to the end: none may wait on a lock a dropped one left.
    for i in 0..REQUESTS {
        tokio::time::timeout(Duration::from_secs(10), request(i))
            .await
            .unwrap_or_else(|_| {
                panic!("request {i} blocked behind a transaction a dropped request left open")
            })
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
    }

    // And every effect is committed, once: seen from a connection of its own.
    let committed: i64 =
        sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) FROM products WHERE sku LIKE 'dropped-%'")
            .fetch_one(&mut other)
            .await
            .unwrap()
            .get(0);
    assert_eq!(committed, REQUESTS as i64);
}

/// SQLite: an admin request writes through the pool, behind the batch
/// writer's gate. Dropped while its connection still holds the file's write
/// lock (a statement of its transaction in flight on sqlx's worker thread),
/// it must keep the gate until that connection has let go. Else the batch
/// writer, next through the gate, meets a locked file and sleeps in SQLite's
/// busy handler (up to 5 s) with every hot request of the service waiting
/// behind it. (Seen failing before: the writer slept at the locked file.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_request_dropped_mid_statement_keeps_the_writers_gate_until_its_lock_is_gone() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = Store::open_with_batch_writer(&db.url, &stock_svc::MIGRATIONS, Default::default())
        .await
        .unwrap();
    let writer = store
        .writer
        .clone()
        .expect("a batch writer on a SQLite file");
    let (reached, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let reached = std::sync::Mutex::new(Some(reached));
    let admin = run_once(
        &store,
        RequestKey {
            method: "Restock",
            request_id: "admin",
            fingerprint: vec![1],
        },
        async |conn: &mut AnyConnection| {
            let internal = |e: sqlx::Error| tonic::Status::internal(e.to_string());
            sqlx::query(INSERT_PRODUCT)
                .bind("admin")
                .execute(&mut *conn)
                .await
                .map_err(internal)?;
            if let Some(reached) = reached.lock().unwrap().take() {
                let _ = reached.send(());
            }
            // About a second of work, its transaction holding the lock.
            sqlx::query(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) \
                 SELECT COUNT(*) FROM c",
            )
            .execute(&mut *conn)
            .await
            .map_err(internal)?;
            Ok(())
        },
    );
    let mut admin = Box::pin(admin);
    tokio::select! {
        _ = &mut admin => panic!("the admin request ended before its write"),
        _ = reached_rx => {}
    }
    // Polled on, so that its long statement is sent; then its caller leaves.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut admin)
            .await
            .is_err(),
        "the long statement ended within 50 ms"
    );
    drop(admin);

    let hot = run_once_batched(
        &store,
        RequestKey {
            method: "Restock",
            request_id: "hot",
            fingerprint: vec![1],
        },
        Refusal::MayWrite,
        async |_: &mut AnyConnection| unreachable!("SQLite"),
        |conn: &rusqlite::Connection| {
            conn.execute(INSERT_PRODUCT, ["hot"])
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            Ok(())
        },
    );
    tokio::time::timeout(Duration::from_secs(30), hot)
        .await
        .expect("the hot request was answered")
        .expect("the hot request was written");
    assert_eq!(
        writer.busy_waits(),
        0,
        "the batch writer met the file locked by the dropped request's connection"
    );
    let skus: Vec<String> = sqlx::query_scalar("SELECT sku FROM products ORDER BY sku")
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(
        skus,
        vec!["hot".to_owned()],
        "the dropped request wrote nothing"
    );
}
