//! `DURABILITY`: what a service's commits wait for. `full` (the default)
//! waits for the disk; `relaxed` only for the operating system or the
//! PostgreSQL server. Checked on each connection a service's store commits
//! through: the pool's and, on SQLite, the batch writer's. And what the
//! orchestrator does when PostgreSQL restarts under relaxed commits. (What
//! relaxed commits survive is tested by the chaos runner, `chaos.rs`.)

use std::time::Duration;

use ordersaga_proto::{client::OrderClient, orders::v1::OrderStatus};
use ordersaga_tests::{
    Backend, TestDb,
    process::orchestrator_process,
    system::{DomainServices, Options, order},
};
use svc_kit::{batch_writer::Outcome, durability::Durability, store::Store};

use crate::{assertions::request_id, bins};

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

/// An order that completes, placed and awaited.
async fn completes(client: &OrderClient) {
    let placed = client
        .create_order_and_wait(
            order(&request_id(), "alice", &[("BOOK", 1)], "DE"),
            Duration::from_secs(30),
        )
        .await
        .expect("the order is placed");
    assert_eq!(
        OrderStatus::try_from(placed.status),
        Ok(OrderStatus::Completed),
        "{placed:?}"
    );
}

/// How PostgreSQL goes down.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Crash {
    /// `kill -9` of every server process, then a start: a crash recovery.
    WholeServer,
    /// The same, before the relaxed orchestrator wrote anything: what it
    /// read at start-up may have held relaxed commits the crash took back,
    /// so its mark must already be there.
    WholeServerBeforeAnyWrite,
    /// `kill -9` of one backend of the relaxed orchestrator's: the server
    /// ends every session and recovers from its WAL, its main process (and
    /// its start time) the same.
    OneBackend,
}

/// PostgreSQL crashes and comes back, with two orchestrators on it: one
/// relaxed, one not. With `synchronous_commit=off` the crash recovery may
/// have taken back commits the relaxed one's drivers went on from, so at
/// its next write it stops, with an error, for its next start to recover
/// from the database. The one on full durability lost nothing and goes on
/// serving.
async fn a_relaxed_orchestrator_stops_after_a_crash_recovery_and_a_full_one_goes_on(crash: Crash) {
    let root = tempfile::tempdir().unwrap();
    let mut postgres = chaos::postgres::Postgres::create(root.path(), None)
        .await
        .expect("a PostgreSQL server of the test's own");
    let services = DomainServices::start(Backend::Sqlite, &Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let relaxed_url = postgres.create_database("orders_relaxed").await.unwrap();
    let mut relaxed = orchestrator_process(
        bins::ORCHESTRATOR,
        dir.path(),
        &relaxed_url,
        &services,
        &[("DURABILITY", "relaxed".to_owned())],
    );
    let mut full = orchestrator_process(
        bins::ORCHESTRATOR,
        dir.path(),
        &postgres.create_database("orders_full").await.unwrap(),
        &services,
        &[],
    );
    relaxed.start().await;
    full.start().await;
    let (relaxed_client, full_client) = (relaxed.order_client().await, full.order_client().await);
    if crash != Crash::WholeServerBeforeAnyWrite {
        completes(&relaxed_client).await;
    }
    completes(&full_client).await;

    match crash {
        Crash::WholeServer | Crash::WholeServerBeforeAnyWrite => {
            postgres.kill9().await.unwrap();
            postgres.start().await.unwrap();
        }
        Crash::OneBackend => {
            let pool = sqlx::any::AnyPoolOptions::new()
                .max_connections(1)
                .connect(&relaxed_url)
                .await
                .unwrap();
            // A session may end between the query and the kill: another one.
            let mut killed = false;
            for _ in 0..20 {
                let backend: Option<i32> = sqlx::query_scalar(
                    "SELECT pid FROM pg_stat_activity \
                     WHERE datname = current_database() AND backend_type = 'client backend' \
                     AND pid <> pg_backend_pid() LIMIT 1",
                )
                .fetch_optional(&pool)
                .await
                .unwrap();
                if let Some(backend) = backend {
                    killed = std::process::Command::new("kill")
                        .args(["-9", &backend.to_string()])
                        .status()
                        .unwrap()
                        .success();
                    if killed {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(killed, "no session of the relaxed orchestrator's to kill");
        }
    }

    // Orders keep coming to the relaxed one until it stops.
    let placing = tokio::spawn(async move {
        loop {
            let _ = relaxed_client
                .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let status = relaxed.wait_for_exit(Duration::from_secs(60)).await;
    placing.abort();
    assert!(
        !status.success(),
        "the relaxed orchestrator ended without an error: {status}"
    );
    // The other one reconnects and goes on.
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let placed = full_client
                .create_order_and_wait(
                    order(&request_id(), "alice", &[("BOOK", 1)], "DE"),
                    Duration::from_secs(10),
                )
                .await;
            if placed.is_ok_and(|o| o.status == OrderStatus::Completed as i32) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the full-durability orchestrator completes orders after the crash");
    full.kill().await;
    postgres.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relaxed_orchestrator_stops_when_postgresql_crashes_and_a_full_one_goes_on() {
    a_relaxed_orchestrator_stops_after_a_crash_recovery_and_a_full_one_goes_on(Crash::WholeServer)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relaxed_orchestrator_that_wrote_nothing_yet_stops_when_postgresql_crashes() {
    a_relaxed_orchestrator_stops_after_a_crash_recovery_and_a_full_one_goes_on(
        Crash::WholeServerBeforeAnyWrite,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relaxed_orchestrator_stops_when_one_backend_crashes_and_a_full_one_goes_on() {
    a_relaxed_orchestrator_stops_after_a_crash_recovery_and_a_full_one_goes_on(Crash::OneBackend)
        .await;
}
