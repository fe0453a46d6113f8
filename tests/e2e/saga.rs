//! The order saga end to end: real services over real sockets, effects counted
//! in each service's own store.

use std::time::Duration;

use orchestrator::EngineArgs;
use ordersaga_proto::{
    client::OrderClient,
    orders::v1::{ListOrdersRequest, Order, OrderStatus, StepPhase, StepStatus},
};
use ordersaga_tests::{
    Backend,
    system::{Options, System, order},
};
use svc_kit::fault::FaultSettings;
use tonic::Code;

use crate::assertions::{assert_status, request_id};

on_both_stores!(
    happy_path_completes_with_each_effect_once,
    out_of_stock_fails_at_once_with_nothing_to_compensate,
    unshippable_country_releases_the_stock,
    insufficient_funds_cancels_the_shipment_and_releases_the_stock,
    create_is_idempotent_on_request_id,
    cancel_before_payment_compensates,
    cancel_after_payment_is_refused,
    orders_are_listed_filtered_and_paged,
    watch_streams_each_change_until_terminal,
    create_order_is_validated_and_authenticated,
    an_order_is_never_charged_a_price_the_catalogue_no_longer_has,
);

const WAIT: Duration = Duration::from_secs(60);

fn status(order: &Order) -> OrderStatus {
    OrderStatus::try_from(order.status).unwrap()
}

/// (name, phase, status) of each recorded step, in log order.
fn steps(order: &Order) -> Vec<(String, StepPhase, StepStatus)> {
    order
        .steps
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                StepPhase::try_from(s.phase).unwrap(),
                StepStatus::try_from(s.status).unwrap(),
            )
        })
        .collect()
}

fn step(name: &str, phase: StepPhase, status: StepStatus) -> (String, StepPhase, StepStatus) {
    (name.to_owned(), phase, status)
}

async fn happy_path_completes_with_each_effect_once(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let order = client
        .create_order_and_wait(
            order(&request_id(), "alice", &[("BOOK", 2), ("PEN", 3)], "DE"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(status(&order), OrderStatus::Completed, "{order:?}");
    assert_eq!(order.total_cents, 2 * 1_500 + 3 * 250);
    assert_eq!(order.currency, "EUR");
    assert_eq!(
        steps(&order),
        vec![
            step("reserve_stock", StepPhase::Forward, StepStatus::Succeeded),
            step(
                "prepare_shipment",
                StepPhase::Forward,
                StepStatus::Succeeded
            ),
            step("charge_payment", StepPhase::Forward, StepStatus::Succeeded),
        ]
    );
    assert!(
        order
            .steps
            .iter()
            .all(|s| s.attempts == 1 && s.started_at.is_some() && s.finished_at.is_some())
    );

    let effects = system.services.effects().await;
    assert_eq!(
        (
            effects.reserved,
            effects.shipments_prepared,
            effects.charged
        ),
        (1, 1, 1)
    );
    assert_eq!(effects.products["BOOK"], (10_000 - 2, 2));
    assert_eq!(effects.charged_cents, order.total_cents);
    effects.assert_conserved();

    let fetched = client.get_order(&order.order_id).await.unwrap();
    assert_eq!(fetched, order);
}

async fn out_of_stock_fails_at_once_with_nothing_to_compensate(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let order = client
        .create_order_and_wait(order(&request_id(), "alice", &[("RARE", 5)], "DE"), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&order), OrderStatus::Failed, "{order:?}");
    assert_eq!(
        steps(&order),
        vec![step(
            "reserve_stock",
            StepPhase::Forward,
            StepStatus::Failed
        )]
    );
    assert!(
        order.failure_reason.contains("out of stock"),
        "{}",
        order.failure_reason
    );
    assert_eq!(
        order.steps[0].attempts, 1,
        "a definite failure is not retried"
    );
    let effects = system.services.effects().await;
    assert_eq!(
        (
            effects.reserved,
            effects.shipments_prepared,
            effects.charged
        ),
        (0, 0, 0)
    );
    effects.assert_conserved();
}

async fn unshippable_country_releases_the_stock(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let order = client
        .create_order_and_wait(order(&request_id(), "alice", &[("BOOK", 4)], "AQ"), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&order), OrderStatus::Compensated, "{order:?}");
    assert_eq!(
        steps(&order),
        vec![
            step("reserve_stock", StepPhase::Forward, StepStatus::Succeeded),
            step("prepare_shipment", StepPhase::Forward, StepStatus::Failed),
            step(
                "reserve_stock",
                StepPhase::Compensation,
                StepStatus::Succeeded
            ),
        ]
    );
    assert!(
        order.failure_reason.contains("AQ"),
        "{}",
        order.failure_reason
    );
    let effects = system.services.effects().await;
    assert_eq!(effects.products["BOOK"], (10_000, 0), "stock released");
    assert_eq!((effects.reserved, effects.released_with_stock), (0, 1));
    assert_eq!((effects.shipments_prepared, effects.charged), (0, 0));
    effects.assert_conserved();
}

async fn insufficient_funds_cancels_the_shipment_and_releases_the_stock(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let order = client
        .create_order_and_wait(order(&request_id(), "poor", &[("BOOK", 1)], "DE"), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&order), OrderStatus::Compensated, "{order:?}");
    assert_eq!(
        steps(&order),
        vec![
            step("reserve_stock", StepPhase::Forward, StepStatus::Succeeded),
            step(
                "prepare_shipment",
                StepPhase::Forward,
                StepStatus::Succeeded
            ),
            step("charge_payment", StepPhase::Forward, StepStatus::Failed),
            step(
                "prepare_shipment",
                StepPhase::Compensation,
                StepStatus::Succeeded
            ),
            step(
                "reserve_stock",
                StepPhase::Compensation,
                StepStatus::Succeeded
            ),
        ]
    );
    assert!(
        order.failure_reason.contains("insufficient funds"),
        "{}",
        order.failure_reason
    );
    let effects = system.services.effects().await;
    assert_eq!(
        (effects.shipments_prepared, effects.shipments_cancelled),
        (0, 1)
    );
    assert_eq!((effects.reserved, effects.released_with_stock), (0, 1));
    assert_eq!((effects.charged, effects.balances["poor"]), (0, 100));
    effects.assert_conserved();
}

async fn create_is_idempotent_on_request_id(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let rid = request_id();
    let request = order(&rid, "alice", &[("BOOK", 1)], "DE");
    let concurrent: Vec<_> = (0..8)
        .map(|_| {
            let client = client.clone();
            let request = request.clone();
            tokio::spawn(async move { client.create_order(request).await })
        })
        .collect();
    let mut ids = Vec::new();
    for result in futures::future::join_all(concurrent).await {
        ids.push(result.unwrap().unwrap().order_id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one order for one request_id: {ids:?}");
    let later = client
        .create_order_and_wait(request.clone(), WAIT)
        .await
        .unwrap();
    assert_eq!(later.order_id, ids[0]);
    assert_eq!(status(&later), OrderStatus::Completed);

    let mut changed = request;
    changed.items[0].quantity = 2;
    assert_status(
        client.create_order(changed).await.map(tonic::Response::new),
        Code::InvalidArgument,
        &["request_id", "different"],
    );
    let all = client
        .list_orders(ListOrdersRequest::default())
        .await
        .unwrap();
    assert_eq!(all.orders.len(), 1);
    let effects = system.services.effects().await;
    assert_eq!(
        (
            effects.reserved,
            effects.shipments_prepared,
            effects.charged
        ),
        (1, 1, 1)
    );
}

async fn cancel_before_payment_compensates(backend: Backend) {
    // Shipping is slow, so the order can be caught before its payment.
    let options = Options {
        shipping_faults: FaultSettings {
            fault_latency_ms: 1_500,
            ..Default::default()
        },
        ..Default::default()
    };
    let system = System::start(backend, options).await;
    let client = system.client().await;
    let created = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 3)], "DE"))
        .await
        .unwrap();
    let cancelled = client
        .cancel_order(&created.order_id, request_id(), "changed my mind")
        .await
        .unwrap();
    assert_eq!(cancelled.order_id, created.order_id);
    // Cancelling again is harmless.
    client
        .cancel_order(&created.order_id, request_id(), "really")
        .await
        .unwrap();

    let order = client
        .create_order_and_wait(
            order(&created.request_id, "alice", &[("BOOK", 3)], "DE"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(status(&order), OrderStatus::Cancelled, "{order:?}");
    assert!(
        order
            .steps
            .iter()
            .all(|s| !(s.name == "charge_payment" && s.status == StepStatus::Succeeded as i32)),
        "no charge after a cancel: {order:?}"
    );
    // Told at its end by the driver, as the log holds it after the cancel.
    assert_eq!(client.get_order(&order.order_id).await.unwrap(), order);
    let effects = system.services.effects().await;
    assert_eq!(
        (
            effects.reserved,
            effects.shipments_prepared,
            effects.charged
        ),
        (0, 0, 0)
    );
    assert_eq!(effects.products["BOOK"], (10_000, 0));
    effects.assert_conserved();
}

async fn cancel_after_payment_is_refused(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let order = client
        .create_order_and_wait(order(&request_id(), "alice", &[("PEN", 1)], "DE"), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&order), OrderStatus::Completed);
    let refused = client
        .cancel_order(&order.order_id, request_id(), "too late")
        .await;
    assert_status(
        refused.map(tonic::Response::new),
        Code::FailedPrecondition,
        &["payment has been charged"],
    );
    let missing = client
        .cancel_order(uuid::Uuid::new_v4().to_string(), request_id(), "")
        .await;
    assert_status(
        missing.map(tonic::Response::new),
        Code::NotFound,
        &["not found"],
    );
    assert_eq!(system.services.effects().await.charged, 1);
}

async fn orders_are_listed_filtered_and_paged(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    for _ in 0..3 {
        client
            .create_order_and_wait(order(&request_id(), "alice", &[("PEN", 1)], "DE"), WAIT)
            .await
            .unwrap();
    }
    for _ in 0..2 {
        client
            .create_order_and_wait(order(&request_id(), "poor", &[("PEN", 1)], "DE"), WAIT)
            .await
            .unwrap();
    }
    let completed = client
        .list_orders(ListOrdersRequest {
            statuses: vec![OrderStatus::Completed as i32],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(completed.orders.len(), 3);
    assert!(completed.orders.iter().all(|o| o.customer_id == "alice"));
    let poor = client
        .list_orders(ListOrdersRequest {
            customer_id: "poor".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(poor.orders.len(), 2);
    assert!(
        poor.orders
            .iter()
            .all(|o| o.status == OrderStatus::Compensated as i32)
    );

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_orders(ListOrdersRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.orders.len() <= 2);
        seen.extend(
            page.orders
                .into_iter()
                .map(|o| (o.created_at.unwrap().seconds, o.order_id)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 5, "every order exactly once across pages");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);
    assert!(seen.windows(2).all(|w| w[0].0 >= w[1].0), "newest first");

    let bad = client
        .list_orders(ListOrdersRequest {
            statuses: vec![42],
            ..Default::default()
        })
        .await;
    assert_status(
        bad.map(tonic::Response::new),
        Code::InvalidArgument,
        &["statuses[0]"],
    );
    let bad_token = client
        .list_orders(ListOrdersRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await;
    assert_status(
        bad_token.map(tonic::Response::new),
        Code::InvalidArgument,
        &["page_token"],
    );
    // Asked for PENDING alone (no order waits there), the other fields are
    // still checked. (Seen failing: answered an empty page.)
    let pending_bad_token = client
        .list_orders(ListOrdersRequest {
            statuses: vec![OrderStatus::Pending as i32],
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await;
    assert_status(
        pending_bad_token.map(tonic::Response::new),
        Code::InvalidArgument,
        &["page_token"],
    );
}

async fn watch_streams_each_change_until_terminal(backend: Backend) {
    let options = Options {
        payment_faults: FaultSettings {
            fault_latency_ms: 300,
            ..Default::default()
        },
        ..Default::default()
    };
    let system = System::start(backend, options).await;
    let client = system.client().await;
    let created = client
        .create_order(order(&request_id(), "poor", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    let mut stream = client.watch_order(&created.order_id).await.unwrap();
    let mut statuses = Vec::new();
    while let Some(update) = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("watch stalled")
        .unwrap()
    {
        statuses.push(status(&update.order.unwrap()));
    }
    assert_eq!(
        statuses.last(),
        Some(&OrderStatus::Compensated),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&OrderStatus::Compensating),
        "the compensation is seen: {statuses:?}"
    );
    assert!(
        statuses.len() >= 3,
        "several changes are streamed: {statuses:?}"
    );
}

async fn create_order_is_validated_and_authenticated(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let good = order(&request_id(), "alice", &[("BOOK", 1)], "DE");
    let cases: Vec<(&str, ordersaga_proto::orders::v1::CreateOrderRequest)> = vec![
        ("request_id", {
            let mut r = good.clone();
            r.request_id.clear();
            r
        }),
        ("customer_id", {
            let mut r = good.clone();
            r.customer_id = "x".repeat(200);
            r
        }),
        ("items", {
            let mut r = good.clone();
            r.items.clear();
            r
        }),
        ("items[0].quantity", {
            let mut r = good.clone();
            r.items[0].quantity = 0;
            r
        }),
        ("items[0].sku", {
            let mut r = good.clone();
            r.items[0].sku = "no spaces".into();
            r
        }),
        ("shipping_address", {
            let mut r = good.clone();
            r.shipping_address = None;
            r
        }),
        ("shipping_address.country", {
            let mut r = good.clone();
            r.shipping_address.as_mut().unwrap().country = "Germany".into();
            r
        }),
        ("shipping_address.city", {
            let mut r = good.clone();
            r.shipping_address.as_mut().unwrap().city.clear();
            r
        }),
    ];
    for (field, request) in cases {
        assert_status(
            client.create_order(request).await.map(tonic::Response::new),
            Code::InvalidArgument,
            &[field],
        );
    }
    let unknown = order(&request_id(), "alice", &[("BOOK", 1), ("NOPE", 1)], "DE");
    assert_status(
        client.create_order(unknown).await.map(tonic::Response::new),
        Code::NotFound,
        &["items[1].sku", "NOPE"],
    );
    let get_bad = client.get_order("not-a-uuid").await;
    assert_status(
        get_bad.map(tonic::Response::new),
        Code::InvalidArgument,
        &["order_id"],
    );

    let keyless =
        ordersaga_proto::client::OrderClient::connect(system.orchestrator.endpoint(), "wrong")
            .await
            .unwrap();
    assert_status(
        keyless
            .create_order(good.clone())
            .await
            .map(tonic::Response::new),
        Code::Unauthenticated,
        &["x-api-key"],
    );

    // Nothing was recorded, and the request_id is still free.
    assert!(
        client
            .list_orders(ListOrdersRequest::default())
            .await
            .unwrap()
            .orders
            .is_empty()
    );
    let effects = system.services.effects().await;
    assert_eq!(effects.reserved, 0);
    client
        .create_order(good)
        .await
        .expect("the valid order goes through");
}

/// 200 orders against services that fail 20% of calls before the work and drop
/// 20% of replies after it. Every saga must end as its inputs dictate, with each
/// effect exactly once.
pub async fn survives_faults(backend: Backend) {
    let faults = FaultSettings {
        fault_unavailable_rate: 0.2,
        fault_drop_reply_rate: 0.2,
        fault_latency_ms: 0,
    };
    let options = Options {
        // A budget large enough that no step's outcome stays unknown by chance
        // (0.4^40), so the expected end state of each order is certain.
        engine: Some(EngineArgs {
            step_max_attempts: 40,
            retry_initial_backoff_ms: 2,
            retry_max_backoff_ms: 50,
            compensation_max_backoff_ms: 50,
            ..Default::default()
        }),
        ..Options::faults_everywhere(faults)
    };
    let system = System::start(backend, options).await;
    let client = system.client().await;
    let orders: Vec<(String, &str, &str)> = (0..200)
        .map(|i| {
            let customer = if i % 10 == 0 { "poor" } else { "alice" };
            let country = if i % 25 == 1 { "AQ" } else { "DE" };
            (request_id(), customer, country)
        })
        .collect();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let tasks: Vec<_> = orders
        .iter()
        .map(|(rid, customer, country)| {
            let client = client.clone();
            let request = order(rid, customer, &[("BOOK", 1), ("PEN", 2)], country);
            let semaphore = semaphore.clone();
            tokio::spawn(async move {
                let _permit = semaphore.acquire().await.unwrap();
                // Creating is idempotent, so the client retries it through faults too.
                loop {
                    match client.create_order_and_wait(request.clone(), WAIT).await {
                        Ok(order)
                            if OrderStatus::try_from(order.status).unwrap()
                                != OrderStatus::Running
                                && OrderStatus::try_from(order.status).unwrap()
                                    != OrderStatus::Compensating =>
                        {
                            return order;
                        }
                        Ok(_) => continue,
                        Err(status) if status.code() == Code::Unavailable => continue,
                        Err(status) => panic!("create failed: {status:?}"),
                    }
                }
            })
        })
        .collect();
    // One deadline for the whole run: a saga that never ends fails the test
    // instead of hanging it.
    let finished: Vec<Order> = tokio::time::timeout(
        Duration::from_secs(180),
        futures::future::try_join_all(tasks),
    )
    .await
    .expect("every order ends within 180 s")
    .unwrap();
    assert!(
        finished
            .iter()
            .any(|o| o.steps.iter().any(|s| s.attempts > 1)),
        "the faults forced retries"
    );
    let mut completed = 0;
    for (order, (_, customer, country)) in finished.iter().zip(&orders) {
        let expected = if *country == "AQ" || *customer == "poor" {
            OrderStatus::Compensated
        } else {
            OrderStatus::Completed
        };
        assert_eq!(status(order), expected, "{order:?}");
        if expected == OrderStatus::Completed {
            completed += 1;
        }
    }
    let effects = system.services.effects().await;
    assert_eq!(effects.reserved, completed, "{effects:?}");
    assert_eq!(effects.shipments_prepared, completed);
    assert_eq!(effects.charged, completed);
    assert_eq!(effects.refunded, 0);
    assert_eq!(effects.released_with_stock, 200 - completed);
    assert_eq!(effects.products["BOOK"].1, completed);
    assert_eq!(effects.products["PEN"].1, 2 * completed);
    effects.assert_conserved();
}

mod survives_20_percent_failures_and_20_percent_dropped_replies {
    #[tokio::test(flavor = "multi_thread")]
    async fn sqlite() {
        super::survives_faults(ordersaga_tests::Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres() {
        super::survives_faults(ordersaga_tests::Backend::Postgres).await
    }
}

on_both_stores!(an_order_told_at_its_end_is_the_order_the_log_holds);

/// A `CreateOrder` that waits is answered with the saga as its driver kept
/// it, step by step, rather than read back from the log: it must be the
/// order `GetOrder` reads, field for field, whichever way it ended, with
/// steps tried more than once (calls failed or their replies lost).
async fn an_order_told_at_its_end_is_the_order_the_log_holds(backend: Backend) {
    let faults = FaultSettings {
        fault_unavailable_rate: 0.2,
        fault_drop_reply_rate: 0.2,
        fault_latency_ms: 0,
    };
    let system = System::start(backend, Options::faults_everywhere(faults)).await;
    let client = system.client().await;
    let orders = (0..24).map(|i| {
        let client = client.clone();
        async move {
            let request = match i % 4 {
                0 => order(&request_id(), "alice", &[("BOOK", 1)], "DE"),
                1 => order(&request_id(), "poor", &[("BOOK", 1)], "DE"),
                2 => order(&request_id(), "alice", &[("RARE", 5)], "DE"),
                _ => order(&request_id(), "alice", &[("BOOK", 1)], "AQ"),
            };
            // Pricing asks the stock service too, faults and all: a client
            // tries again with the same request.
            for _ in 0..20 {
                match client.create_order_and_wait(request.clone(), WAIT).await {
                    Err(status) if status.code() == Code::Unavailable => continue,
                    answer => return answer.unwrap(),
                }
            }
            panic!("pricing stayed unavailable")
        }
    });
    let told = futures::future::join_all(orders).await;
    let mut retried = 0;
    for order in &told {
        let fetched = client.get_order(&order.order_id).await.unwrap();
        assert_eq!(&fetched, order);
        retried += usize::from(order.steps.iter().any(|s| s.attempts > 1));
    }
    let statuses: std::collections::HashSet<_> = told.iter().map(status).collect();
    assert!(statuses.len() >= 3, "too few ways to end: {statuses:?}");
    assert!(retried > 0, "no step was tried twice");
}

on_both_stores!(a_compensation_that_keeps_failing_stays_visible_and_is_announced);

/// The stock service goes away after the reservation, so its release keeps
/// failing: the saga stays COMPENSATING with its last error and attempt count,
/// and `order.compensation_stuck` is written to the outbox once.
/// An unshippable order (AQ is not served) whose reservation must be
/// released, with the stock service stopped once it reserved: the release
/// keeps failing.
async fn an_order_whose_release_keeps_failing(
    backend: Backend,
    engine: EngineArgs,
) -> (System, OrderClient, Order) {
    let options = Options {
        // Shipping is slow, so the stock service can be stopped in between.
        shipping_faults: FaultSettings {
            fault_latency_ms: 1_000,
            ..Default::default()
        },
        engine: Some(engine),
        ..Default::default()
    };
    let mut system = System::start(backend, options).await;
    let client = system.client().await;
    let created = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "AQ"))
        .await
        .unwrap();
    ordersaga_tests::eventually("the reservation", WAIT, || async {
        let order = client.get_order(&created.order_id).await.ok()?;
        order
            .steps
            .iter()
            .any(|s| s.name == "reserve_stock" && s.status == StepStatus::Succeeded as i32)
            .then_some(())
    })
    .await;
    system.services.stock.halt().await;
    (system, client, created)
}

async fn a_compensation_that_keeps_failing_stays_visible_and_is_announced(backend: Backend) {
    let engine = EngineArgs {
        compensation_max_backoff_ms: 50,
        compensation_stuck_after_secs: 1,
        ..Default::default()
    };
    let (system, client, created) = an_order_whose_release_keeps_failing(backend, engine).await;

    let pool = system.orchestrator.db.pool().await;
    let stuck = ordersaga_tests::eventually("the stuck announcement", WAIT, || {
        let pool = pool.clone();
        let id = created.order_id.clone();
        async move {
            let payload: Option<String> = sqlx::query_scalar(
                "SELECT payload FROM outbox WHERE aggregate_id = $1 AND event_type = 'order.compensation_stuck'",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .unwrap();
            payload
        }
    })
    .await;
    let stuck: serde_json::Value = serde_json::from_str(&stuck).unwrap();
    assert_eq!(stuck["step"], "reserve_stock");
    assert_eq!(stuck["status"], "COMPENSATING");
    assert!(stuck["attempts"].as_i64().unwrap() >= 2, "{stuck}");

    let order = client.get_order(&created.order_id).await.unwrap();
    assert_eq!(status(&order), OrderStatus::Compensating, "{order:?}");
    let release = order
        .steps
        .iter()
        .find(|s| s.name == "reserve_stock" && s.phase == StepPhase::Compensation as i32)
        .expect("the release step is visible");
    assert_eq!(release.status, StepStatus::Running as i32);
    assert!(release.attempts >= 2, "{release:?}");
    assert!(release.last_error.contains("Unavailable"), "{release:?}");
    let announcements: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outbox WHERE aggregate_id = $1 AND event_type = 'order.compensation_stuck'",
    )
    .bind(&created.order_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(announcements, 1, "announced once");
}

/// The orchestrator keeps looked-up prices; the stock service checks each
/// order's prices when it reserves. A price changed behind the orchestrator's
/// back is refused, never charged, and the next order is priced afresh.
async fn an_order_is_never_charged_a_price_the_catalogue_no_longer_has(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let client = system.client().await;
    let book = |request_id: String| order(&request_id, "alice", &[("BOOK", 1)], "DE");
    let first = client
        .create_order_and_wait(book(request_id()), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&first), OrderStatus::Completed, "{first:?}");
    assert_eq!(first.total_cents, 1_500);

    // The price changes in the stock service's own store, which nobody tells
    // the orchestrator about.
    sqlx::query("UPDATE products SET unit_price_cents = 1750 WHERE sku = 'BOOK'")
        .execute(&system.services.stock.db.pool().await)
        .await
        .unwrap();
    let second = client
        .create_order_and_wait(book(request_id()), WAIT)
        .await
        .unwrap();
    // Priced from the kept price, then refused when reserved: nothing taken.
    assert_eq!(status(&second), OrderStatus::Failed, "{second:?}");
    assert!(
        second.failure_reason.contains("price changed"),
        "{:?}",
        second.failure_reason
    );
    let third = client
        .create_order_and_wait(book(request_id()), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&third), OrderStatus::Completed, "{third:?}");
    assert_eq!(third.total_cents, 1_750, "priced afresh after the refusal");

    let effects = system.services.effects().await;
    assert_eq!(effects.charged, 2);
    assert_eq!(
        effects.charged_cents,
        1_500 + 1_750,
        "each order charged the catalogue's price when it was reserved"
    );
    assert_eq!(effects.reserved, 2);
}

on_both_stores!(a_compensation_failing_past_its_budget_leaves_the_order_needing_attention);

/// As above, with a budget: past it the compensation gives up, and the
/// order rests NEEDS_ATTENTION with the cause, announced once, no longer
/// retried.
async fn a_compensation_failing_past_its_budget_leaves_the_order_needing_attention(
    backend: Backend,
) {
    let engine = EngineArgs {
        compensation_max_backoff_ms: 50,
        compensation_attention_after_secs: 2,
        ..Default::default()
    };
    let (system, client, created) = an_order_whose_release_keeps_failing(backend, engine).await;

    let resting = ordersaga_tests::eventually("NEEDS_ATTENTION", WAIT, || async {
        let order = client.get_order(&created.order_id).await.ok()?;
        (status(&order) == OrderStatus::NeedsAttention).then_some(order)
    })
    .await;
    assert!(
        resting
            .failure_reason
            .contains("undoing reserve_stock failed for 2 s")
            && resting.failure_reason.contains("Unavailable"),
        "{}",
        resting.failure_reason
    );
    let release = resting
        .steps
        .iter()
        .find(|s| s.name == "reserve_stock" && s.phase == StepPhase::Compensation as i32)
        .expect("the release step is visible");
    assert_eq!(release.status, StepStatus::Failed as i32, "{release:?}");
    assert!(release.attempts >= 2, "{release:?}");
    assert!(release.last_error.contains("Unavailable"), "{release:?}");

    let pool = system.orchestrator.db.pool().await;
    let announced: Vec<String> = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE aggregate_id = $1 AND event_type = 'order.needs_attention'",
    )
    .bind(&created.order_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(announced.len(), 1, "announced once: {announced:?}");
    let event: serde_json::Value = serde_json::from_str(&announced[0]).unwrap();
    assert_eq!(event["status"], "NEEDS_ATTENTION");

    // Resting, not retried: the attempts stay where they were.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = client.get_order(&created.order_id).await.unwrap();
    assert_eq!(later.steps, resting.steps, "the saga was still driven");
}

/// PostgreSQL: the log's statements find rows by key, however small their
/// tables were when their plans were made. On a new database the plan of
/// the log's check for events already written was made while the outbox
/// was nearly empty and read it whole from then on, each batch, until
/// autovacuum next analyzed it: a cost that grew with every event. The
/// batch statement found its sagas by reading the partial index of open
/// sagas whole (its entries stay until vacuum), then filtering by ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_statements_read_no_table_whole_as_it_grows() {
    const ORDERS: usize = 120;
    let mut system = System::start(Backend::Postgres, Options::default()).await;
    let client = system.client().await;
    let orders = (0..ORDERS).map(|i| {
        let client = client.clone();
        async move {
            let customer = if i % 10 == 0 { "broke" } else { "alice" };
            client
                .create_order_and_wait(order(&request_id(), customer, &[("PEN", 1)], "DE"), WAIT)
                .await
                .unwrap()
        }
    });
    for order in futures::future::join_all(orders).await {
        assert!(
            matches!(
                status(&order),
                OrderStatus::Completed | OrderStatus::Compensated
            ),
            "{order:?}"
        );
    }
    // A session's statistics reach the server's views when it ends (or
    // after it sat idle for a while).
    system.orchestrator.halt().await;
    let pool = system.orchestrator.db.pool().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (read_whole, inserted) = loop {
        let (read_whole, inserted): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(seq_tup_read), 0)::bigint, \
               COALESCE(SUM(n_tup_ins) FILTER (WHERE relname = 'outbox'), 0)::bigint \
             FROM pg_stat_user_tables",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if inserted >= 2 * ORDERS as i64 || std::time::Instant::now() > deadline {
            break (read_whole, inserted);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        inserted >= 2 * ORDERS as i64,
        "only {inserted} events counted"
    );
    assert_eq!(read_whole, 0, "rows read by sequential scans");
    // Nor the partial index of open sagas whole: its entries stay until
    // vacuum, and a batch that found its sagas through it (then filtered
    // them by ID) read every one of them. Only the replicas' lease ticks
    // read it now (every open saga of a lapsed owner).
    let (scans, entries): (i64, i64) = sqlx::query_as(
        "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes \
         WHERE indexrelname = 'sagas_open_by_owner'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // 120 orders read 6,429 entries in 35 scans so; 195 in 4 without.
    assert!(
        entries <= 15 * ORDERS as i64,
        "{entries} entries of sagas_open_by_owner read in {scans} scans"
    );
}
