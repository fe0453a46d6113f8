//! The batch RPCs (`ReserveStockBatch`, `PrepareShipmentBatch`,
//! `ChargeBatch`): each item is run and answered as its own call would be,
//! refusals and their details included, and a replay of either form gets the
//! other's stored answer. What the server does per call it does per item:
//! metrics under the item's method, a slot of MAX_CONCURRENT_CALLS, the
//! injected faults.

use ordersaga_proto::{
    errors::{Reason, field_violations, refusal},
    payment::v1::{ChargeBatchItem, ChargeBatchRequest, ChargeRequest, DepositRequest},
    shipping::v1::{
        Address, PrepareShipmentBatchItem, PrepareShipmentBatchRequest, PrepareShipmentRequest,
        prepare_shipment_batch_result,
    },
    stock::v1::{
        OrderLine, ReserveStockBatchItem, ReserveStockBatchRequest, ReserveStockBatchResponse,
        ReserveStockRequest, ReserveStockResponse, RestockRequest,
    },
};
use ordersaga_tests::{Backend, admin, authed, services};
use svc_kit::fault::FaultSettings;
use tonic::{Code, Status};

use crate::{
    assertions::{assert_status, order_id, request_id, terminal_order},
    stock::{levels, seed},
};

on_both_stores!(
    each_item_of_a_batch_is_answered_as_its_own_call_and_replayed_by_either_form,
    shipping_and_payment_batches_answer_each_item,
    a_batch_item_past_the_call_limit_is_shed_alone,
    a_dropped_reply_is_dropped_per_item_after_its_work,
    orders_too_large_to_share_one_request_all_complete,
);

fn reserve(request_id: &str, sku: &str, quantity: i64) -> ReserveStockRequest {
    ReserveStockRequest {
        request_id: request_id.into(),
        order_id: order_id(),
        lines: vec![OrderLine {
            sku: sku.into(),
            quantity,
            ..Default::default()
        }],
    }
}

fn batch_of(
    requests: impl IntoIterator<Item = Option<ReserveStockRequest>>,
) -> ReserveStockBatchRequest {
    ReserveStockBatchRequest {
        items: requests
            .into_iter()
            .map(|request| ReserveStockBatchItem {
                request,
                ..Default::default()
            })
            .collect(),
    }
}

/// Each item's reply, or its status as its own call would have ended.
fn outcomes(response: ReserveStockBatchResponse) -> Vec<Result<ReserveStockResponse, Status>> {
    response.results.into_iter().map(Result::from).collect()
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    outcome: &Result<T, Status>,
    code: Code,
    reason: Option<Reason>,
) {
    let status = outcome.as_ref().expect_err("a refusal");
    assert_eq!(status.code(), code, "{status:?}");
    if let Some(reason) = reason {
        assert_eq!(
            refusal(status).map(|r| r.reason),
            Some(reason),
            "{status:?}"
        );
    }
}

async fn each_item_of_a_batch_is_answered_as_its_own_call_and_replayed_by_either_form(
    backend: Backend,
) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 3, 150).await;

    let first = reserve(&request_id(), "APPLE", 1);
    let short = reserve(&request_id(), "APPLE", 5);
    let mut malformed = reserve(&request_id(), "APPLE", 1);
    malformed.lines[0].quantity = 0;
    let batch = batch_of([
        Some(first.clone()),
        Some(malformed),
        Some(reserve(&request_id(), "KIWI", 1)),
        Some(short.clone()),
        None,
        // The same request twice in one batch: run once, answered twice.
        Some(first.clone()),
    ]);
    let results = outcomes(
        client
            .reserve_stock_batch(authed(batch))
            .await
            .expect("a well-formed batch")
            .into_inner(),
    );
    assert_eq!(results.len(), 6, "{results:?}");
    let reserved = results[0].as_ref().expect("the first item is reserved");
    assert_refused(&results[1], Code::InvalidArgument, None);
    assert_eq!(
        field_violations(results[1].as_ref().unwrap_err())
            .into_iter()
            .map(|(field, _)| field)
            .collect::<Vec<_>>(),
        ["lines[0].quantity"],
        "the item's own field path, as its call would name it"
    );
    assert_refused(&results[2], Code::NotFound, Some(Reason::UnknownSku));
    assert_refused(
        &results[3],
        Code::FailedPrecondition,
        Some(Reason::OutOfStock),
    );
    assert_refused(&results[4], Code::InvalidArgument, None);
    assert!(
        results[4]
            .as_ref()
            .unwrap_err()
            .message()
            .contains("request"),
        "{:?}",
        results[4]
    );
    assert_eq!(
        results[5].as_ref().expect("the same request, replayed"),
        reserved
    );
    assert_eq!(levels(&mut client, "APPLE").await, (2, 1), "reserved once");

    // A call alone replays what the batch stored, refusals included.
    let alone = client
        .reserve_stock(authed(first))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&alone, reserved);
    seed(&mut client, "APPLE", 10, 150).await;
    assert_status(
        client.reserve_stock(authed(short)).await,
        Code::FailedPrecondition,
        &["out of stock"],
    );
    assert_eq!(levels(&mut client, "APPLE").await, (12, 1));

    // And a batch replays what a call alone stored.
    let lone = reserve(&request_id(), "APPLE", 2);
    let lone_reply = client
        .reserve_stock(authed(lone.clone()))
        .await
        .unwrap()
        .into_inner();
    let replayed = outcomes(
        client
            .reserve_stock_batch(authed(batch_of([Some(lone)])))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(replayed[0].as_ref().unwrap(), &lone_reply);
    assert_eq!(levels(&mut client, "APPLE").await, (10, 3));

    // The batch's shape is refused whole, nothing run.
    assert_status(
        client.reserve_stock_batch(authed(batch_of([]))).await,
        Code::InvalidArgument,
        &["items", "empty"],
    );
    let too_many = batch_of((0..257).map(|_| Some(reserve(&request_id(), "APPLE", 1))));
    assert_status(
        client.reserve_stock_batch(authed(too_many)).await,
        Code::InvalidArgument,
        &["items", "256"],
    );
    assert_eq!(levels(&mut client, "APPLE").await, (10, 3));

    // Each item counts under its own method; the batch under its own.
    let metrics = svc.scrape().await;
    for (series, count) in [
        (
            r#"method="stock.v1.StockService/ReserveStock",code="Ok""#,
            5,
        ),
        (
            r#"method="stock.v1.StockService/ReserveStock",code="FailedPrecondition""#,
            2,
        ),
        (
            r#"method="stock.v1.StockService/ReserveStock",code="InvalidArgument""#,
            2,
        ),
        (
            r#"method="stock.v1.StockService/ReserveStock",code="NotFound""#,
            1,
        ),
        (
            r#"method="stock.v1.StockService/ReserveStockBatch",code="Ok""#,
            2,
        ),
        (
            r#"method="stock.v1.StockService/ReserveStockBatch",code="InvalidArgument""#,
            2,
        ),
    ] {
        let line = format!("grpc_server_handled_total{{{series}}} {count}");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }

    // Without a key, nothing is run.
    let mut keyless = svc.stock().await;
    assert_status(
        keyless
            .reserve_stock_batch(tonic::Request::new(batch_of([Some(reserve(
                &request_id(),
                "APPLE",
                1,
            ))])))
            .await,
        Code::Unauthenticated,
        &["x-api-key"],
    );
    assert_eq!(levels(&mut client, "APPLE").await, (10, 3));
}

async fn shipping_and_payment_batches_answer_each_item(backend: Backend) {
    let shipping = services::shipping(backend).await;
    let prepare = |country: &str| PrepareShipmentBatchItem {
        request: Some(PrepareShipmentRequest {
            request_id: request_id(),
            order_id: order_id(),
            address: Some(Address {
                recipient: "Ada Lovelace".into(),
                line1: "12 St James's Square".into(),
                city: "London".into(),
                postal_code: "SW1Y 4JH".into(),
                country: country.into(),
            }),
            service_level: 0,
            item_count: 2,
        }),
        ..Default::default()
    };
    let answer = shipping
        .shipping()
        .await
        .prepare_shipment_batch(authed(PrepareShipmentBatchRequest {
            items: vec![prepare("DE"), prepare("AQ")],
        }))
        .await
        .unwrap()
        .into_inner();
    use prepare_shipment_batch_result::Outcome as Shipped;
    match &answer.results[..] {
        [first, second] => {
            assert!(
                matches!(first.outcome, Some(Shipped::Reply(_))),
                "{answer:?}"
            );
            let Some(Shipped::Error(error)) = second.outcome.clone() else {
                panic!("AQ is not served: {answer:?}")
            };
            assert_refused::<()>(
                &Err(error.into()),
                Code::FailedPrecondition,
                Some(Reason::CountryNotServed),
            );
        }
        other => panic!("two results expected: {other:?}"),
    }

    let payment = services::payment(backend).await;
    let mut client = payment.payment().await;
    client
        .deposit(admin(DepositRequest {
            request_id: request_id(),
            customer_id: "alice".into(),
            amount_cents: 1_000,
            currency: "EUR".into(),
        }))
        .await
        .unwrap();
    let charge = |cents: i64| ChargeBatchItem {
        request: Some(ChargeRequest {
            request_id: request_id(),
            order_id: order_id(),
            customer_id: "alice".into(),
            amount_cents: cents,
            currency: "EUR".into(),
        }),
        ..Default::default()
    };
    let answer = client
        .charge_batch(authed(ChargeBatchRequest {
            items: vec![charge(600), charge(600)],
        }))
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<Result<_, Status>> = answer.results.into_iter().map(Result::from).collect();
    // Two charges that each fit and together do not: one is taken, the
    // other refused; which is up to the order they commit in.
    let taken = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(taken, 1, "{outcomes:?}");
    let refused = outcomes.iter().find(|o| o.is_err()).unwrap();
    assert_refused(
        refused,
        Code::FailedPrecondition,
        Some(Reason::InsufficientFunds),
    );
}

async fn a_batch_item_past_the_call_limit_is_shed_alone(backend: Backend) {
    let svc = services::stock_configured(backend, |server| server.max_concurrent_calls = 2).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let answer = client
        .reserve_stock_batch(authed(batch_of(
            (0..4).map(|_| Some(reserve(&request_id(), "APPLE", 1))),
        )))
        .await
        .expect("the batch itself takes one slot")
        .into_inner();
    let results = outcomes(answer);
    // The batch's slot is its first item's; the second takes the other;
    // the last two find none.
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert_refused(
        &results[2],
        Code::ResourceExhausted,
        Some(Reason::Overloaded),
    );
    assert_refused(
        &results[3],
        Code::ResourceExhausted,
        Some(Reason::Overloaded),
    );
    assert_eq!(
        levels(&mut client, "APPLE").await,
        (8, 2),
        "the shed items wrote nothing"
    );
}

async fn a_dropped_reply_is_dropped_per_item_after_its_work(backend: Backend) {
    let svc = services::stock_with_faults(
        backend,
        FaultSettings {
            fault_drop_reply_rate: 1.0,
            ..Default::default()
        },
    )
    .await;
    let mut client = svc.stock().await;
    // Every reply is dropped, the restock's too; its work is done.
    let _ = client
        .restock(admin(RestockRequest {
            request_id: request_id(),
            sku: "APPLE".into(),
            quantity: 10,
            name: "Apple".into(),
            unit_price_cents: 150,
            currency: "EUR".into(),
        }))
        .await;
    let answer = client
        .reserve_stock_batch(authed(batch_of(
            (0..3).map(|_| Some(reserve(&request_id(), "APPLE", 1))),
        )))
        .await
        .expect("the batch is answered; its items' replies are dropped")
        .into_inner();
    for result in outcomes(answer) {
        let status = result.expect_err("every reply dropped");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("reply dropped"), "{status:?}");
    }
    let pool = svc.db.pool().await;
    let levels: (i64, i64) =
        sqlx::query_as("SELECT available, reserved FROM products WHERE sku = 'APPLE'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(levels, (7, 3), "each item's work was done");
}

/// Forty orders of 100 lines with 64-byte SKUs, at once: each reservation
/// is about 8 KiB, so forty of them in one batch would be five times the
/// services' 64 KiB request limit, and a batch over it is refused whole.
/// The orchestrator's batches stop short of it, and every order completes.
async fn orders_too_large_to_share_one_request_all_complete(backend: Backend) {
    let system = ordersaga_tests::system::System::start(backend, Default::default()).await;
    let mut stock = system.services.stock.stock().await;
    let skus: Vec<String> = (0..100)
        .map(|i| format!("{:-<64}", format!("LARGE-{i:03}-")))
        .collect();
    for sku in &skus {
        seed(&mut stock, sku, 40, 1).await;
    }
    let client = system.client().await;
    let lines: Vec<(&str, i64)> = skus.iter().map(|sku| (sku.as_str(), 1)).collect();
    let created = futures::future::join_all((0..40).map(|_| {
        let client = client.clone();
        let request = ordersaga_tests::system::order(&request_id(), "alice", &lines, "DE");
        async move {
            client
                .create_order(request)
                .await
                .expect("an order of 100 lines")
        }
    }))
    .await;
    for order in created {
        let order =
            terminal_order(&client, &order.order_id, std::time::Duration::from_secs(60)).await;
        assert_eq!(
            order.status,
            ordersaga_proto::orders::v1::OrderStatus::Completed as i32,
            "{:?} {:?}",
            order.failure_reason,
            order.steps
        );
        // Not completed after all by a retry in a smaller batch: no batch
        // was ever refused.
        assert!(
            order.steps.iter().all(|s| s.attempts == 1),
            "{:?}",
            order.steps
        );
    }
    assert_eq!(levels(&mut stock, &skus[0]).await, (0, 40));
    let metrics = system.services.stock.scrape().await;
    assert!(
        !metrics.contains(r#"method="stock.v1.StockService/ReserveStockBatch",code="OutOfRange""#),
        "{metrics}"
    );
}
