//! PostgreSQL: the saga steps' requests share commits (the shared
//! transaction), each still counts exactly once, and a stalled commit
//! holds nothing up for long.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use ordersaga_tests::{Backend, TestDb};
use sqlx::{AnyConnection, Connection};
use svc_kit::{
    idempotency::{
        Claim, Claimed, Refusal, RequestKey, run_once_batched, run_once_batched_claiming,
    },
    shared_transaction::{Guard, SharedTransaction, TurnResult},
    store::Store,
};

const REQUESTS: usize = 64;

/// A stock database on PostgreSQL (kept while the `TestDb` lives) with one
/// product, `HOT`, at 0 available: the row every test request updates.
async fn hot_row_store() -> (TestDb, Store) {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::open_with_batch_writer(&db.url, &stock_svc::MIGRATIONS, Default::default())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO products (sku, name, unit_price_cents, currency, available, reserved, created_at_ms, updated_at_ms) \
         VALUES ('HOT', 'x', 1, 'EUR', 0, 0, 0, 0)",
    )
    .execute(&store.pool)
    .await
    .unwrap();
    (db, store)
}

/// 64 requests at once on one hot row: every effect lands once, their
/// replies come after a commit, and they needed far fewer commits than
/// requests (each committed alone before the shared transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_hot_row_share_commits_and_each_counts_once() {
    let (_db, store) = hot_row_store().await;
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
                Refusal::MayWrite,
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

/// A request alone in the service, whose effect is one statement that
/// writes all of its parts and its claim or nothing
/// (`Refusal::OneStatement`), commits with that statement: no `BEGIN`, no
/// `COMMIT`, no batch. Its repeat writes nothing and gets its reply.
/// Requests that come together still share their commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_alone_commits_with_its_statement_and_requests_together_share_commits() {
    let (db, store) = hot_row_store().await;
    let shared = store
        .shared
        .clone()
        .expect("PostgreSQL has a shared transaction");
    let request = |i: usize| {
        let store = &store;
        async move {
            let request_id = format!("one-{i}");
            let key = RequestKey {
                method: "Restock",
                request_id: &request_id,
                fingerprint: vec![1],
            };
            run_once_batched_claiming(
                store,
                key,
                Refusal::OneStatement,
                async |conn: &mut AnyConnection, claim: Option<&Claim<'_>>| {
                    let claim = claim.expect("on the shared transaction, a claim");
                    let query = sqlx::query(
                        "WITH taken AS ( \
                           UPDATE products SET available = available + 1 WHERE sku = 'HOT' \
                             AND NOT EXISTS (SELECT 1 FROM idempotency WHERE request_id = $1) RETURNING 1), \
                         claim AS ( \
                           INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
                           SELECT $1, $2, $3, $4, 0, $5 FROM taken RETURNING 1) \
                         SELECT COUNT(*) FROM taken",
                    );
                    let taken: i64 = claim
                        .bind(query, &())
                        .fetch_one(conn)
                        .await
                        .and_then(|row| sqlx::Row::try_get(&row, 0))
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    match taken {
                        1 => Ok(((), Claimed::Yes)),
                        // Claimed before, as the services refuse a repeat
                        // (its order's rows are there): the stored reply
                        // is the answer.
                        _ => Err(tonic::Status::failed_precondition("claimed before")),
                    }
                },
                |_: &rusqlite::Connection| unreachable!("PostgreSQL"),
            )
            .await
        }
    };
    let available = async || -> i64 {
        sqlx::query_scalar("SELECT available FROM products WHERE sku = 'HOT'")
            .fetch_one(&store.pool)
            .await
            .unwrap()
    };
    let (commits, alone) = (shared.commits(), shared.alone());
    for round in 0..2 {
        for i in 0..10 {
            request(i)
                .await
                .unwrap_or_else(|e| panic!("request {i}, round {round}: {e}"));
        }
    }
    assert_eq!(available().await, 10, "each effect once, repeats none");
    assert_eq!(shared.alone() - alone, 20, "a request did not run alone");
    assert_eq!(shared.commits(), commits, "a lone request opened a batch");

    // The connection kept from the last request, closed by the server (as
    // a restart would): a lone request that finds it does not fail, and its
    // effect counts once, as does its repeat's.
    assert!(close_every_connection(&db).await >= 1);
    request(10)
        .await
        .expect("the request that found the closed connection");
    request(10).await.expect("its repeat");
    assert_eq!(available().await, 11, "each effect once, repeats none");

    let (commits, alone) = (shared.commits(), shared.alone());
    let replies = futures::future::join_all((11..11 + REQUESTS).map(request)).await;
    for (i, reply) in replies.into_iter().enumerate() {
        reply.unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    assert_eq!(available().await, 11 + REQUESTS as i64);
    let (commits, alone) = (shared.commits() - commits, shared.alone() - alone);
    assert!(
        alone + commits <= (REQUESTS / 2) as u64,
        "{REQUESTS} requests together ran alone {alone} times and took {commits} commits: \
         they did not share them"
    );
}

/// A `COMMIT` that does not answer (here a deferred trigger that sleeps at
/// commit time, as a stalled server would) fails its batch after the
/// timeout with UNAVAILABLE, and the requests after it are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_does_not_answer_fails_its_batch_and_holds_up_nothing_after_it() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::open(&db.url, &stock_svc::MIGRATIONS, Default::default())
        .await
        .unwrap();
    crate::assertions::stall_commits_after_inserts(&store.pool, "products", "NEW.sku = 'SLOW'")
        .await;
    let shared = SharedTransaction::new(store.pool.clone(), Duration::from_secs(2));
    let insert = |sku: &'static str| {
        let shared = &shared;
        async move {
            shared
                .run(Guard::Savepoint, async |conn: &mut AnyConnection| {
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

/// One batch of turns that end every way a turn can: written, refused for
/// good (the effect rolled back, the refusal stored), failed (the effect and
/// the claim rolled back). Each turn's savepoint is released by the next
/// turn, so this checks that a turn rolled back to its savepoint takes back
/// its own writes and never a neighbour's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_that_are_written_refused_or_failed_in_one_batch_each_keep_only_their_own_effect() {
    let (_db, store) = hot_row_store().await;
    // Every request adds 1, then ends as its number says.
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Ends {
        Written,
        Refused,
        Failed,
    }
    let ends = |i: usize| match i % 5 {
        1 | 3 => Ends::Refused,
        4 => Ends::Failed,
        _ => Ends::Written,
    };
    let request = |i: usize, fail: bool| {
        let store = &store;
        async move {
            let request_id = format!("mixed-{i}");
            let key = RequestKey {
                method: "Restock",
                request_id: &request_id,
                fingerprint: vec![2],
            };
            run_once_batched(
                store,
                key,
                Refusal::MayWrite,
                async |conn: &mut AnyConnection| {
                    sqlx::query("UPDATE products SET available = available + 1 WHERE sku = 'HOT'")
                        .execute(conn)
                        .await
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                    match ends(i) {
                        Ends::Refused => Err(tonic::Status::failed_precondition(format!("no {i}"))),
                        Ends::Failed if fail => {
                            Err(tonic::Status::unavailable(format!("later {i}")))
                        }
                        _ => Ok(()),
                    }
                },
                |_: &rusqlite::Connection| unreachable!("PostgreSQL"),
            )
            .await
        }
    };
    let replies = futures::future::join_all((0..REQUESTS).map(|i| request(i, true))).await;
    for (i, reply) in replies.into_iter().enumerate() {
        match (ends(i), reply) {
            (Ends::Written, Ok(())) => {}
            (Ends::Refused, Err(status)) => {
                assert_eq!(
                    status.code(),
                    tonic::Code::FailedPrecondition,
                    "request {i}"
                );
                assert_eq!(status.message(), format!("no {i}"));
            }
            (Ends::Failed, Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
            (end, reply) => panic!("request {i} should end {end:?}, got {reply:?}"),
        }
    }
    let available = |pool: &sqlx::AnyPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT available FROM products WHERE sku = 'HOT'")
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let written = (0..REQUESTS).filter(|&i| ends(i) == Ends::Written).count() as i64;
    assert_eq!(
        available(&store.pool).await,
        written,
        "only the written turns' effects"
    );
    let claims: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idempotency")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    let failed = (0..REQUESTS).filter(|&i| ends(i) == Ends::Failed).count() as i64;
    assert_eq!(
        claims,
        REQUESTS as i64 - failed,
        "a failed turn leaves no claim"
    );
    // Again, the failed ones now succeeding: they run, the rest replay.
    for (i, reply) in futures::future::join_all((0..REQUESTS).map(|i| request(i, false)))
        .await
        .into_iter()
        .enumerate()
    {
        match ends(i) {
            Ends::Refused => assert_eq!(reply.unwrap_err().message(), format!("no {i}")),
            _ => reply.unwrap_or_else(|e| panic!("request {i} on its retry: {e}")),
        }
    }
    assert_eq!(available(&store.pool).await, written + failed);
}

/// A request and its repeat sent at once often land in one batch, where the
/// first one is not committed yet: the repeat gets the same reply all the
/// same (read inside the batch's transaction), and the effect happens once.
/// (Seen failing when replies were stored with the batch, just before its
/// `COMMIT`, and a repeat in the same batch found the claim without one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_in_the_same_batch_gets_the_reply_its_first_left_to_be_stored() {
    a_repeat_in_the_same_batch(Refusal::MayWrite).await;
}

/// The same without savepoints: a repeat's effect, undone when its claim
/// is found, rolls back the batch its first is in, claim and all. The
/// first runs again, and the repeat too, until one finds the other's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_in_the_same_batch_without_savepoints_gets_the_reply_of_its_first() {
    a_repeat_in_the_same_batch(Refusal::WritesNothing).await;
}

async fn a_repeat_in_the_same_batch(refusal: Refusal) {
    let (_db, store) = hot_row_store().await;
    const DISTINCT: usize = REQUESTS / 2;
    let request = |i: usize| {
        let store = &store;
        async move {
            let request_id = format!("twice-{i}");
            let key = RequestKey {
                method: "Restock",
                request_id: &request_id,
                fingerprint: vec![3],
            };
            run_once_batched(
                store,
                key,
                refusal,
                // The reply: the count after this request's own increment.
                async |conn: &mut AnyConnection| {
                    sqlx::query_scalar::<_, i64>(
                        "UPDATE products SET available = available + 1 WHERE sku = 'HOT' RETURNING available",
                    )
                    .fetch_one(conn)
                    .await
                    .map_err(|e| tonic::Status::internal(e.to_string()))
                },
                |_: &rusqlite::Connection| unreachable!("PostgreSQL"),
            )
            .await
        }
    };
    // Each request next to its repeat.
    let replies = futures::future::join_all((0..2 * DISTINCT).map(|n| request(n / 2))).await;
    let mut counts = Vec::new();
    for (i, pair) in replies.chunks(2).enumerate() {
        let first = pair[0]
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        let repeat = pair[1]
            .as_ref()
            .unwrap_or_else(|e| panic!("repeat of {i}: {e}"));
        assert_eq!(first, repeat, "request {i} and its repeat");
        counts.push(*first);
    }
    counts.sort();
    assert_eq!(
        counts,
        (1..=DISTINCT as i64).collect::<Vec<_>>(),
        "each effect once"
    );
    // And once committed, from the table.
    for (i, reply) in futures::future::join_all((0..DISTINCT).map(request))
        .await
        .into_iter()
        .enumerate()
    {
        reply.unwrap_or_else(|e| panic!("request {i} once more: {e}"));
    }
}

/// A batch opens on the connection the last batch committed on: taking one
/// from the pool and giving it back cost two round trips per batch (sqlx
/// pings a connection on both). A kept connection is not pinged, nor is one
/// the pool hands out within a second of its last use, so when the server
/// closed them all (as a restart would), the request that finds them must
/// not fail: the batch opens on a connection that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_keep_their_connection_and_replace_it_when_the_server_closed_it() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::open(&db.url, &stock_svc::MIGRATIONS, Default::default())
        .await
        .unwrap();
    // Several idle connections in the pool, which hands them out in turn.
    let held: Vec<_> = futures::future::join_all((0..4).map(|_| store.pool.acquire()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    drop(held);
    let shared = SharedTransaction::new(store.pool.clone(), Duration::from_secs(10));
    let backend = || {
        let shared = &shared;
        async move {
            shared
                .run(Guard::Savepoint, async |conn: &mut AnyConnection| {
                    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                        .fetch_one(conn)
                        .await?;
                    Ok(TurnResult::Written(pid))
                })
                .await
        }
    };
    let first = backend().await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            backend().await.unwrap(),
            first,
            "a batch took another connection"
        );
    }
    let ended = close_every_connection(&db).await;
    assert!(ended >= 2, "{ended} connections closed");
    let next = backend()
        .await
        .expect("the request that found the closed connections failed");
    assert_ne!(next, first);
}

/// Has the server close every connection to `db`'s database (as a restart
/// would), and waits until it did; how many there were.
async fn close_every_connection(db: &TestDb) -> usize {
    let mut admin = AnyConnection::connect(&db.url).await.unwrap();
    let database: String = sqlx::query_scalar("SELECT CAST(current_database() AS TEXT)")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&database)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    // The server closes the sessions in its own time.
    for _ in 0..250 {
        let alive: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&database)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if alive == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ended.len()
}

/// Without savepoints (`Refusal::WritesNothing`), one batch of turns that
/// end every way: written; refused for good, having written nothing (as
/// the promise goes); failed after writing; a statement that fails (which
/// aborts the whole transaction on PostgreSQL). The failed ones roll their
/// batch back, its other requests run again, and each written effect
/// counts once. A round where nothing fails takes no savepoint at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_without_savepoints_that_fail_make_their_batch_run_again_and_each_counts_once() {
    let (_db, store) = hot_row_store().await;
    let shared = store.shared.clone().expect("a shared transaction");
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Ends {
        Written,
        Refused,
        Failed,
        Broken,
    }
    let ends = |i: usize, round: &str| match (round, i % 7) {
        ("mixed", 2) => Ends::Failed,
        ("mixed", 5) => Ends::Broken,
        (_, 1 | 4) => Ends::Refused,
        _ => Ends::Written,
    };
    let request = |i: usize, round: &'static str| {
        let store = &store;
        async move {
            let request_id = format!("{round}-{i}");
            let key = RequestKey {
                method: "Restock",
                request_id: &request_id,
                fingerprint: vec![4],
            };
            let end = ends(i, round);
            run_once_batched(
                store,
                key,
                Refusal::WritesNothing,
                async |conn: &mut AnyConnection| {
                    let internal = |e: sqlx::Error| tonic::Status::internal(e.to_string());
                    if end == Ends::Refused {
                        return Err(tonic::Status::failed_precondition(format!("no {i}")));
                    }
                    sqlx::query("UPDATE products SET available = available + 1 WHERE sku = 'HOT'")
                        .execute(&mut *conn)
                        .await
                        .map_err(internal)?;
                    match end {
                        Ends::Failed => Err(tonic::Status::unavailable(format!("later {i}"))),
                        Ends::Broken => {
                            sqlx::query("SELECT 1 / 0")
                                .execute(&mut *conn)
                                .await
                                .map_err(internal)?;
                            unreachable!("1 / 0 fails")
                        }
                        _ => Ok(()),
                    }
                },
                |_: &rusqlite::Connection| unreachable!("PostgreSQL"),
            )
            .await
        }
    };
    let count = |sql: &'static str| {
        let pool = store.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let available = "SELECT available FROM products WHERE sku = 'HOT'";
    let claims = "SELECT COUNT(*) FROM idempotency";

    let redone = shared.redone();
    let replies = futures::future::join_all((0..REQUESTS).map(|i| request(i, "mixed"))).await;
    for (i, reply) in replies.into_iter().enumerate() {
        match (ends(i, "mixed"), reply) {
            (Ends::Written, Ok(())) => {}
            (Ends::Refused, Err(status)) => assert_eq!(status.message(), format!("no {i}")),
            (Ends::Failed, Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
            (Ends::Broken, Err(status)) => {
                assert!(status.message().contains("division by zero"), "{status:?}")
            }
            (end, reply) => panic!("request {i} should end {end:?}, got {reply:?}"),
        }
    }
    let of = |end: Ends| (0..REQUESTS).filter(|&i| ends(i, "mixed") == end).count() as i64;
    assert_eq!(
        count(available).await,
        of(Ends::Written),
        "each written effect once"
    );
    assert_eq!(
        count(claims).await,
        of(Ends::Written) + of(Ends::Refused),
        "a failed turn leaves no claim"
    );
    assert!(
        shared.redone() > redone,
        "no batch was rolled back for a failed turn"
    );

    let savepoints = shared.savepoints();
    let before = count(available).await;
    let replies = futures::future::join_all((0..REQUESTS).map(|i| request(i, "clean"))).await;
    let written = (0..REQUESTS)
        .filter(|&i| ends(i, "clean") == Ends::Written)
        .count() as i64;
    assert_eq!(
        replies.iter().filter(|reply| reply.is_ok()).count() as i64,
        written
    );
    assert_eq!(count(available).await, before + written);
    assert_eq!(shared.savepoints(), savepoints, "a savepoint was taken");
}

/// A turn that adds 1 to `HOT` after `sleep` seconds (holding the turn),
/// counting its runs, and ends as `end` says.
async fn add_after(
    shared: &SharedTransaction,
    runs: &AtomicUsize,
    sleep: f64,
    end: fn(()) -> TurnResult<()>,
) -> Result<(), svc_kit::Error> {
    shared
        .run(Guard::Redo, async move |conn: &mut AnyConnection| {
            runs.fetch_add(1, Ordering::Relaxed);
            sqlx::query("SELECT pg_sleep($1)")
                .bind(sleep)
                .execute(&mut *conn)
                .await?;
            sqlx::query("UPDATE products SET available = available + 1 WHERE sku = 'HOT'")
                .execute(&mut *conn)
                .await?;
            Ok(end(()))
        })
        .await
}

/// A turn without a savepoint that is undone in the middle of a batch: the
/// batch goes back whole and the turns written before it run again, once,
/// and count once; a turn that wrote nothing and refused is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undone_turn_without_a_savepoint_runs_the_turns_before_it_in_its_batch_again() {
    let (_db, store) = hot_row_store().await;
    let shared = store.shared.clone().expect("a shared transaction");
    let runs = AtomicUsize::new(0);
    let add = |sleep: f64, end: fn(()) -> TurnResult<()>| add_after(&shared, &runs, sleep, end);
    let redone = shared.redone();
    let staggered = |ms: u64, turn: _| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        turn.await
    };
    // The first holds the turn while the others queue behind it, in order.
    let (first, second, undone) = tokio::join!(
        add(0.4, TurnResult::Written),
        staggered(100, add(0.0, TurnResult::Written)),
        staggered(200, add(0.0, TurnResult::Nothing)),
    );
    first.unwrap();
    second.unwrap();
    undone.unwrap();
    assert_eq!(
        shared.redone() - redone,
        2,
        "the two turns before it ran again"
    );
    assert_eq!(runs.load(Ordering::Relaxed), 5);
    let available: i64 = sqlx::query_scalar("SELECT available FROM products WHERE sku = 'HOT'")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(
        available, 2,
        "each written turn once, the undone one not at all"
    );
}

/// A turn dropped in the middle (its client left, its deadline passed)
/// leaves the open transaction in an unknown state: the batch is rolled
/// back, its connection closed. The turns written before it in that batch
/// run again and are answered as if nothing happened; they do not hear
/// UNAVAILABLE for a neighbour's sake. (Seen failing before: both were
/// answered "the batch of this request did not commit".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_dropped_midway_runs_its_neighbours_again_rather_than_failing_them() {
    let (_db, store) = hot_row_store().await;
    let shared = store.shared.clone().expect("a shared transaction");
    let runs = AtomicUsize::new(0);
    let add = |sleep: f64| add_after(&shared, &runs, sleep, TurnResult::Written);
    let redone = shared.redone();
    let later = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    // The first holds the turn while the others queue behind it, in order;
    // the third's client leaves once its turn has begun (the third run),
    // during its statement (whose locks, and the batch's, last until the
    // server ends it: the others' runs again wait that long).
    let (first, second, ()) = tokio::join!(
        add(1.0),
        async {
            later(100).await;
            add(0.0).await
        },
        async {
            later(200).await;
            let third = add(1.5);
            tokio::pin!(third);
            while runs.load(Ordering::Relaxed) < 3 {
                tokio::select! {
                    ended = &mut third => panic!("the third turn ended before its client left: {ended:?}"),
                    () = later(5) => {}
                }
            }
        },
    );
    first.expect("the first turn, written before the dropped one");
    second.expect("the second turn, written before the dropped one");
    assert_eq!(
        shared.redone() - redone,
        2,
        "the two turns before it ran again"
    );
    assert_eq!(runs.load(Ordering::Relaxed), 5);
    let available: i64 = sqlx::query_scalar("SELECT available FROM products WHERE sku = 'HOT'")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(
        available, 2,
        "each written turn once, the dropped one not at all"
    );
}

/// A refusal can rest on a neighbour's write in the same batch: the last
/// unit taken by the request before it. When that batch is rolled back (a
/// later turn without a savepoint was undone) and the neighbour does not
/// run again (its client left), the refusal must not stand: it runs again
/// too, and this time the unit is there. (Seen failing when a refusal was
/// stored in a turn of its own after the one that refused: the request was
/// answered "out of stock" with the unit still on the shelf.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_that_rested_on_an_undone_write_runs_again() {
    let (_db, store) = hot_row_store().await;
    sqlx::query("UPDATE products SET available = 1 WHERE sku = 'HOT'")
        .execute(&store.pool)
        .await
        .unwrap();
    let shared = store.shared.clone().expect("a shared transaction");
    // Takes the one unit, or is refused for good having written nothing.
    let take = |request_id: &'static str| {
        let store = &store;
        async move {
            let key = RequestKey {
                method: "Take",
                request_id,
                fingerprint: vec![5],
            };
            run_once_batched(
                store,
                key,
                Refusal::WritesNothing,
                async |conn: &mut AnyConnection| {
                    let taken = sqlx::query(
                        "UPDATE products SET available = available - 1 WHERE sku = 'HOT' AND available >= 1",
                    )
                    .execute(conn)
                    .await
                    .map_err(|e| tonic::Status::internal(e.to_string()))?
                    .rows_affected();
                    match taken {
                        1 => Ok(()),
                        _ => Err(tonic::Status::failed_precondition("out of stock")),
                    }
                },
                |_: &rusqlite::Connection| unreachable!("PostgreSQL"),
            )
            .await
        }
    };
    // Holds the turn while the others queue behind it, in order.
    let hold = shared.run(Guard::Redo, async |conn: &mut AnyConnection| {
        sqlx::query("SELECT pg_sleep(0.3)").execute(conn).await?;
        Ok(TurnResult::Written(()))
    });
    // Written after a while, then undone: its batch is rolled back.
    let undone = run_once_batched(
        &store,
        RequestKey {
            method: "Take",
            request_id: "undone",
            fingerprint: vec![5],
        },
        Refusal::WritesNothing,
        async |conn: &mut AnyConnection| {
            sqlx::query("SELECT pg_sleep(0.4)")
                .execute(conn)
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            Err::<(), _>(tonic::Status::unavailable("undone"))
        },
        |_: &rusqlite::Connection| unreachable!("PostgreSQL"),
    );
    let later = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    let (held, first, refused, undone) = tokio::join!(
        hold,
        // Its client leaves while the undone turn sleeps: it is not run again.
        async {
            later(100).await;
            tokio::time::timeout(Duration::from_millis(400), take("first")).await
        },
        async {
            later(150).await;
            take("second").await
        },
        async {
            later(200).await;
            undone.await
        },
    );
    held.unwrap();
    assert!(
        first.is_err(),
        "the first request's client did not leave in time"
    );
    assert_eq!(undone.unwrap_err().code(), tonic::Code::Unavailable);
    refused.expect("the second request was refused for a unit that is there");
    let available: i64 = sqlx::query_scalar("SELECT available FROM products WHERE sku = 'HOT'")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(available, 0, "the second request took the unit");
}
