//! Named crash points on real processes: the orchestrator is stopped, paused or
//! made to lose a reply at an exact place (`CRASH_POINTS`, see
//! orchestrator/src/crash_points.rs), then restarted on the same store. Every
//! order must end in exactly one terminal state, each effect at most once and
//! consistent with it, and every event must be there once, in sequence.

use std::{collections::BTreeMap, os::unix::process::ExitStatusExt, time::Duration};

use ordersaga_proto::orders::v1::{CreateOrderRequest, OrderStatus};
use ordersaga_tests::{
    Backend, TestDb,
    broker::{Received, collect_until, consume, rabbitmq_url, unique_exchange},
    process::orchestrator_process,
    system::{DomainServices, Options, order},
};
use svc_kit::fault::FaultSettings;

use crate::{
    assertions::{request_id, terminal_order},
    bins,
};

on_both_stores!(
    a_create_order_whose_caller_left_after_the_commit_is_still_driven,
    a_commit_whose_reply_was_lost_mints_no_second_event,
    abort_after_a_steps_reply_before_its_checkpoint,
    abort_after_a_group_commit_before_the_drivers_are_told,
    abort_between_two_compensations,
    abort_between_an_accepted_cancel_and_the_driver_seeing_it,
    abort_between_the_outbox_commit_and_the_publish_confirm,
    abort_between_create_orders_commit_and_the_start_of_its_saga,
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
    // The dropped call's own start (it ends its pause after the retry drove
    // the saga) must not drive the saga a second time.
    let metric = |metrics: &str, name: &str| -> Option<String> {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    ordersaga_tests::eventually("the first call's start to be done", WAIT, || async {
        let metrics = orchestrator.scrape().await;
        (metric(&metrics, "saga_started_total").as_deref() == Some("1")
            && metric(&metrics, "sagas_in_flight").as_deref() == Some("0"))
        .then_some(())
    })
    .await;
    let metrics = orchestrator.scrape().await;
    assert_eq!(
        metric(&metrics, "saga_finished_total").as_deref(),
        Some("1"),
        "the saga finished once: {metrics}"
    );
    let order = client.get_order(&retried.order_id).await.unwrap();
    assert_eq!(order.status, OrderStatus::Completed as i32, "{order:?}");
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
    // A caller waiting on the saga must be told it ended, though the driver
    // learns it only from the log (its retry finds the saga already closed),
    // not left waiting until its deadline.
    let asked = std::time::Instant::now();
    let created = client
        .create_order_and_wait(order(&request_id(), "alice", &[("BOOK", 1)], "DE"), WAIT)
        .await
        .unwrap();
    assert!(
        // It takes well under a second; the server lets a wait last 30 s.
        asked.elapsed() < Duration::from_secs(10),
        "the waiter was left until its deadline: {:?}",
        asked.elapsed()
    );
    let order = terminal_order(&client, &created.order_id, WAIT).await;
    assert_eq!(order.status, OrderStatus::Completed as i32, "{order:?}");
    // The driver counts the saga finished only once its checkpoint is
    // acknowledged, which is after it applied the checkpoint again.
    ordersaga_tests::eventually("the driver to see its commit", WAIT, || async {
        let metrics = orchestrator.scrape().await;
        metrics
            .lines()
            .any(|l| {
                l.starts_with("saga_finished_total") && l.contains("COMPLETED") && l.ends_with(" 1")
            })
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

async fn abort_after_a_steps_reply_before_its_checkpoint(backend: Backend) {
    abort_at(backend, "step.after_reply").await
}

async fn abort_after_a_group_commit_before_the_drivers_are_told(backend: Backend) {
    abort_at(backend, "log.after_commit").await
}

async fn abort_between_two_compensations(backend: Backend) {
    abort_at(backend, "compensation.between").await
}

async fn abort_between_an_accepted_cancel_and_the_driver_seeing_it(backend: Backend) {
    abort_at(backend, "cancel.after_accept").await
}

async fn abort_between_the_outbox_commit_and_the_publish_confirm(backend: Backend) {
    abort_at(backend, "outbox.after_publish").await
}

async fn abort_between_create_orders_commit_and_the_start_of_its_saga(backend: Backend) {
    abort_at(backend, "start.after_commit").await
}

/// One order of the matrix and the end it must reach.
struct Case {
    request: CreateOrderRequest,
    expected: OrderStatus,
    /// The client cancels it right after creating it.
    cancel: bool,
}

fn cases() -> Vec<Case> {
    let case = |customer, sku, quantity, country, expected| Case {
        request: order(&request_id(), customer, &[(sku, quantity)], country),
        expected,
        cancel: false,
    };
    let mut cases = vec![
        case("alice", "BOOK", 1, "DE", OrderStatus::Completed),
        case("alice", "PEN", 2, "DE", OrderStatus::Completed),
        case("alice", "BOOK", 2, "DE", OrderStatus::Completed),
        // Insufficient funds: the charge is refused, two steps are undone.
        case("poor", "BOOK", 1, "DE", OrderStatus::Compensated),
        // Nobody ships to AQ: the reservation is undone.
        case("alice", "PEN", 1, "AQ", OrderStatus::Compensated),
        // RARE has one unit: nothing to undo.
        case("alice", "RARE", 5, "DE", OrderStatus::Failed),
    ];
    let mut cancelled = case("alice", "BOOK", 3, "DE", OrderStatus::Cancelled);
    cancelled.cancel = true;
    cases.push(cancelled);
    cases
}

/// Runs the matrix's orders against an orchestrator that aborts at `point`
/// the first time it is reached, restarts it, and audits the outcome.
async fn abort_at(backend: Backend, point: &str) {
    // Shipping is slow, so sagas are in flight when the point is reached and
    // a cancel right after a create is accepted.
    let options = Options {
        shipping_faults: FaultSettings {
            fault_latency_ms: 300,
            ..Default::default()
        },
        ..Default::default()
    };
    let services = DomainServices::start(backend, &options).await;
    let exchange = unique_exchange();
    let mut events = consume(&exchange).await;
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut orchestrator = orchestrator_process(
        bins::ORCHESTRATOR,
        dir.path(),
        &db.url,
        &services,
        &[
            ("CRASH_POINTS", format!("{point}=1*abort")),
            ("RABBITMQ_URL", rabbitmq_url()),
            ("EVENTS_EXCHANGE", exchange.clone()),
        ],
    );
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let cases = cases();
    // Before the crash: every create and cancel is sent once; some fail when
    // the process dies under them.
    let mut cancel_accepted = false;
    let creates = cases.iter().map(|case| {
        let client = client.clone();
        async move {
            let created = client.create_order(case.request.clone()).await.ok()?;
            if case.cancel {
                return Some(
                    client
                        .cancel_order(&created.order_id, request_id(), "crash matrix")
                        .await
                        .is_ok(),
                );
            }
            Some(false)
        }
    });
    for accepted in futures::future::join_all(creates).await {
        cancel_accepted |= accepted == Some(true);
    }
    let exit = orchestrator.wait_for_exit(Duration::from_secs(30)).await;
    assert_eq!(
        exit.signal(),
        Some(6),
        "the orchestrator aborts at {point}: {exit:?}"
    );

    orchestrator.set_env("CRASH_POINTS", "");
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let mut outcomes = BTreeMap::new();
    for case in &cases {
        // A client retries what it is not sure of, with the same request_id.
        let created = client.create_order(case.request.clone()).await.unwrap();
        if case.cancel && !cancel_accepted {
            cancel_accepted = client
                .cancel_order(&created.order_id, request_id(), "crash matrix, retried")
                .await
                .is_ok();
        }
        let done = terminal_order(&client, &created.order_id, WAIT).await;
        let status = OrderStatus::try_from(done.status).unwrap();
        let expected = match case.expected {
            // Too late to cancel is a legitimate answer; then it completes.
            OrderStatus::Cancelled if !cancel_accepted => OrderStatus::Completed,
            other => other,
        };
        assert_eq!(status, expected, "at {point}: {done:?}");
        outcomes.insert(done.order_id.clone(), status);
    }
    audit_effects(&services, &outcomes, point).await;
    audit_events(&mut events, &outcomes, point).await;
    orchestrator.kill().await;
}

/// Each effect happened at most once and agrees with its order's outcome,
/// counted in the services' own stores.
async fn audit_effects(
    services: &DomainServices,
    outcomes: &BTreeMap<String, OrderStatus>,
    point: &str,
) {
    let completed = outcomes
        .values()
        .filter(|s| **s == OrderStatus::Completed)
        .count() as i64;
    let effects = services.effects().await;
    assert_eq!(effects.reserved, completed, "at {point}: {effects:?}");
    assert_eq!(
        effects.shipments_prepared, completed,
        "at {point}: {effects:?}"
    );
    assert_eq!(effects.charged, completed, "at {point}: {effects:?}");
    assert_eq!(effects.refunded, 0, "at {point}: {effects:?}");
    effects.assert_conserved();
}

/// Every order's events arrived, deduplicable by `message_id`: `order.created`
/// first, then exactly one terminal event that matches the outcome, numbered
/// 1, 2 with no gap.
async fn audit_events(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Received>,
    outcomes: &BTreeMap<String, OrderStatus>,
    point: &str,
) {
    let terminal_type = |status: OrderStatus| match status {
        OrderStatus::Completed => "order.completed",
        OrderStatus::Compensated => "order.compensated",
        OrderStatus::Cancelled => "order.cancelled",
        OrderStatus::Failed => "order.failed",
        other => panic!("not terminal: {other:?}"),
    };
    let received = collect_until(events, WAIT, |events| {
        outcomes.iter().all(|(id, status)| {
            events.iter().any(|e| {
                e.field("order_id") == id.as_str() && e.routing_key == terminal_type(*status)
            })
        })
    })
    .await;
    for (id, status) in outcomes {
        let mut of_order: Vec<(i64, String)> = received
            .iter()
            .filter(|e| e.field("order_id") == id.as_str())
            .map(|e| (e.field("sequence").as_i64().unwrap(), e.routing_key.clone()))
            .collect();
        of_order.sort();
        assert_eq!(
            of_order,
            vec![
                (1, "order.created".to_owned()),
                (2, terminal_type(*status).to_owned())
            ],
            "events of {id} at {point}"
        );
    }
}
