//! Named crash points on real processes: the orchestrator is stopped, paused or
//! made to lose a reply at an exact place (`CRASH_POINTS`, see
//! orchestrator/src/crash_points.rs), then restarted on the same store. Every
//! order must end in exactly one terminal state, each effect at most once and
//! consistent with it, and every event must be there once, in sequence.

use std::time::Duration;

use ordersaga_proto::orders::v1::OrderStatus;
use ordersaga_tests::{
    Backend, TestDb,
    process::orchestrator_process,
    system::{DomainServices, Options, order},
};

use crate::{
    assertions::{request_id, terminal_order},
    bins,
};

on_both_stores!(
    a_create_order_whose_caller_left_after_the_commit_is_still_driven,
    a_commit_whose_reply_was_lost_mints_no_second_event,
);

const WAIT: Duration = Duration::from_secs(60);

/// The outbox rows of one order: (sequence, event type, event ID).
async fn outbox_of(pool: &sqlx::AnyPool, order_id: &str) -> Vec<(i64, String, String)> {
    sqlx::query_as(
        "SELECT sequence, event_type, event_id FROM outbox WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The caller's deadline passes while `CreateOrder` sits between its commit
/// and the start of its saga, so the handler is dropped. The order exists; it
/// must still be driven, and a retry with the same `request_id` must see it end.
async fn a_create_order_whose_caller_left_after_the_commit_is_still_driven(backend: Backend) {
    let services = DomainServices::start(backend, &Options::default()).await;
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut orchestrator = orchestrator_process(
        bins::ORCHESTRATOR,
        dir.path(),
        &db.url,
        &services,
        &[("CRASH_POINTS", "start.after_commit=1*pause(2000)".into())],
    );
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let request = order(&request_id(), "alice", &[("BOOK", 1)], "DE");
    let gave_up = client
        .create_order_and_wait(request.clone(), Duration::from_millis(300))
        .await
        .expect_err("the caller's deadline passes during the pause");
    assert!(
        matches!(
            gave_up.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{gave_up:?}"
    );
    let retried = client.create_order(request).await.unwrap();
    let order = terminal_order(&client, &retried.order_id, WAIT).await;
    assert_eq!(
        OrderStatus::try_from(order.status).unwrap(),
        OrderStatus::Completed,
        "{order:?}"
    );
    let effects = services.effects().await;
    assert_eq!((effects.reserved, effects.charged), (1, 1), "{effects:?}");
    orchestrator.kill().await;
}

/// The terminal checkpoint commits, but its reply is lost, so the engine
/// applies it again. The event it carries must not be written twice.
async fn a_commit_whose_reply_was_lost_mints_no_second_event(backend: Backend) {
    let services = DomainServices::start(backend, &Options::default()).await;
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut orchestrator = orchestrator_process(
        bins::ORCHESTRATOR,
        dir.path(),
        &db.url,
        &services,
        &[("CRASH_POINTS", "log.after_commit_with_events=1*fail".into())],
    );
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let created = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    let order = terminal_order(&client, &created.order_id, WAIT).await;
    assert_eq!(order.status, OrderStatus::Completed as i32, "{order:?}");
    // The driver counts the saga finished only once its checkpoint is
    // acknowledged, which is after it applied the checkpoint again.
    ordersaga_tests::eventually("the driver to see its commit", WAIT, || async {
        let metrics = orchestrator.scrape().await;
        metrics
            .lines()
            .any(|l| l.starts_with("saga_finished_total") && l.contains("COMPLETED") && l.ends_with(" 1"))
            .then_some(())
    })
    .await;
    let pool = db.pool().await;
    let events = outbox_of(&pool, &created.order_id).await;
    let kinds: Vec<(i64, &str)> = events.iter().map(|(s, t, _)| (*s, t.as_str())).collect();
    assert_eq!(
        kinds,
        vec![(1, "order.created"), (2, "order.completed")],
        "one event per milestone: {events:?}"
    );
    orchestrator.kill().await;
}
