//! A batch's requests in one statement (PostgreSQL's combined statements,
//! `svc_kit::combined`): each request is answered exactly as its own call
//! would be, a hot row's units and funds go in the batch's order and are
//! never overdrawn, the same order or request twice in a batch counts
//! once, and a replay of the batch gets the stored answers byte for byte.
//! On SQLite the same batches (no combined statement there) must give the
//! same answers; on PostgreSQL the metrics show that the statements ran.

use ordersaga_proto::{
    errors::Reason,
    payment::v1::{
        ChargeBatchItem, ChargeBatchRequest, ChargeRequest, ChargeResponse, DepositRequest,
        GetAccountRequest,
    },
    shipping::v1::{
        Address, PrepareShipmentBatchItem, PrepareShipmentBatchRequest, PrepareShipmentRequest,
        PrepareShipmentResponse, shipping_service_client::ShippingServiceClient,
    },
    stock::v1::{
        OrderLine, ReserveStockBatchItem, ReserveStockBatchRequest, ReserveStockRequest,
        ReserveStockResponse,
    },
};
use std::time::Duration;

use ordersaga_tests::{Backend, TestDb, admin, authed, services};
use sqlx::AnyConnection;
use svc_kit::{
    batch::Item,
    combined::{BoxFuture, Combine, Combiner, Offered},
    shared_transaction::SharedTransaction,
    store::Store,
};
use tonic::{Code, Status};

use crate::{
    assertions::{order_id, race_alone, request_id, stored_refusal},
    metrics::sample,
    stock::{levels, seed},
};

on_both_stores!(
    a_products_units_go_in_batch_order_and_the_rest_is_answered_alone,
    an_accounts_funds_go_in_batch_order_each_reply_with_its_own_balance,
    an_order_or_a_request_twice_in_a_batch_counts_once,
);

/// PostgreSQL only: what another process of the service commits while the
/// statement runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_combined_statement_raced_by_another_process_writes_nothing_and_each_request_goes_alone()
{
    a_raced_combined_statement(Backend::Postgres).await
}

/// A statement that writes the even items of a batch as products, and
/// leaves the odd ones out.
struct EvenItems;

impl Combine for EvenItems {
    type Item = i64;
    type Written = ();

    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        items: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<Option<()>>, sqlx::Error>> {
        Box::pin(async move {
            let evens: Vec<i64> = items.iter().copied().filter(|n| n % 2 == 0).collect();
            sqlx::query(
                "INSERT INTO products (sku, name, unit_price_cents, currency, available, reserved, created_at_ms, updated_at_ms) \
                 SELECT 'EVEN-' || value, 'x', 1, 'EUR', 1, 0, 0, 0 FROM jsonb_array_elements_text($1::jsonb)",
            )
            .bind(serde_json::to_string(&evens).unwrap())
            .execute(&mut *conn)
            .await?;
            Ok(items.iter().map(|n| (n % 2 == 0).then_some(())).collect())
        })
    }
}

/// PostgreSQL only: the batch of a combined statement whose `COMMIT` does
/// not answer (a deferred trigger that sleeps at commit, as a stalled
/// server would). The requests the statement wrote hear UNAVAILABLE (their
/// outcome unknown), as their own turns would have; those it left out go
/// on on their own, told so, not failed with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_fails_the_requests_the_statement_wrote_and_no_other() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::open(&db.url, &stock_svc::MIGRATIONS, Default::default())
        .await
        .unwrap();
    crate::assertions::stall_commits_after_inserts(&store.pool, "products", "true").await;
    let shared = SharedTransaction::new(store.pool.clone(), Duration::from_secs(1));
    let combiner = Combiner::new(shared, EvenItems);
    // As the items of a batch RPC: offered in the same moment.
    let answers = tokio::time::timeout(Duration::from_secs(10), offer_batch(combiner, 1..=4))
        .await
        .expect("the stalled COMMIT held the batch past 10 s");
    for (n, answer) in (1..=4).zip(&answers) {
        match n % 2 {
            0 => {
                let status = answer
                    .as_ref()
                    .expect_err("a written request whose commit failed");
                assert_eq!(status.code(), Code::Unavailable, "item {n}: {status:?}");
            }
            _ => assert_eq!(
                answer.as_ref().ok(),
                Some(&"not written"),
                "item {n}: {answer:?}"
            ),
        }
    }
}

/// PostgreSQL only: a batch RPC whose client leaves (the orchestrator was
/// killed, a deadline passed) is dropped wherever it is, its items with it,
/// and among them the one leading their group. Whatever point it is dropped
/// at, the next batch's requests must be combined and answered. A group
/// left in the queue with no leader made every later request wait behind
/// it for good: the service's batched calls hung until it restarted (seen
/// as sagas stuck on their first step after `kill -9` of the orchestrator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_dropped_at_any_await_leaves_the_next_batch_combined_and_answered() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = Store::open(&db.url, &stock_svc::MIGRATIONS, Default::default())
        .await
        .unwrap();
    let shared = SharedTransaction::new(store.pool.clone(), Duration::from_secs(5));
    let combiner = Combiner::new(shared.clone(), EvenItems);
    // Batch k is polled k times, the reactor running between polls, then
    // dropped; the batch after it must be answered, its even items written.
    let mut first = 1;
    for polls in 1..=12 {
        let mut dropped = Box::pin(offer_batch(combiner.clone(), first..=first + 3));
        let mut ended = false;
        for _ in 0..polls {
            if futures::poll!(dropped.as_mut()).is_ready() {
                ended = true;
                break;
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        drop(dropped);
        let next = first + 4;
        let answers: Vec<Result<&str, Status>> = tokio::time::timeout(
            Duration::from_secs(10),
            offer_batch(combiner.clone(), next..=next + 3),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("the batch after one dropped at poll {polls} was not answered within 10 s")
        });
        for (n, answer) in (next..=next + 3).zip(&answers) {
            let expected = if n % 2 == 0 { "written" } else { "not written" };
            assert_eq!(
                answer.as_ref().ok(),
                Some(&expected),
                "item {n} of the batch after one dropped at poll {polls}: {answer:?}"
            );
        }
        first += 8;
        if ended {
            break;
        }
    }
    assert!(
        shared.combined() > 0,
        "no request went in a combined statement: the test shows nothing"
    );
}

/// `numbers` offered to `combiner` as the items of one batch RPC, in the
/// same moment; each item's answer: "written", "not written", or the status
/// it failed with.
async fn offer_batch(
    combiner: Combiner<EvenItems>,
    numbers: std::ops::RangeInclusive<i64>,
) -> Vec<Result<&'static str, Status>> {
    let items: Vec<Item<i64>> = numbers
        .map(|n| Item {
            request: Some(n),
            traceparent: String::new(),
            tracestate: String::new(),
        })
        .collect();
    svc_kit::batch::run(
        &tonic::Extensions::new(),
        "test.v1.Test/Combine",
        items,
        |n| {
            let combiner = &combiner;
            async move {
                match combiner.offer(n).await {
                    Offered::Written(()) => Ok("written"),
                    Offered::NotWritten => Ok("not written"),
                    Offered::Failed(status) => Err(status),
                }
            }
        },
    )
    .await
    .unwrap()
}

/// Requests written by combined statements, from a service's `/metrics`.
async fn combined(svc: &services::Running) -> f64 {
    sample(
        &svc.scrape().await,
        "db_shared_transaction_requests_total{how=\"combined\"}",
    )
}

/// On PostgreSQL, at least `at_least` more requests went in combined
/// statements than `before`; on SQLite there are none.
#[track_caller]
fn assert_combined(backend: Backend, before: f64, after: f64, at_least: f64) {
    match backend {
        Backend::Postgres => assert!(
            after - before >= at_least,
            "{} requests combined, at least {at_least} expected",
            after - before
        ),
        _ => assert_eq!(after, 0.0, "no combined statements off PostgreSQL"),
    }
}

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(outcome: &Result<T, Status>, code: Code, reason: Reason) {
    let status = outcome.as_ref().expect_err("a refusal");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(
        ordersaga_proto::errors::refusal(status).map(|r| r.reason),
        Some(reason),
        "{status:?}"
    );
}

fn priced(sku: &str, quantity: i64, cents: i64) -> ReserveStockRequest {
    ReserveStockRequest {
        request_id: request_id(),
        order_id: order_id(),
        lines: vec![OrderLine {
            sku: sku.into(),
            quantity,
            expected_unit_price_cents: cents,
            expected_currency: "EUR".into(),
        }],
    }
}

async fn reserve_batch(
    svc: &services::Running,
    requests: &[ReserveStockRequest],
) -> Vec<Result<ReserveStockResponse, Status>> {
    let batch = ReserveStockBatchRequest {
        items: requests
            .iter()
            .map(|request| ReserveStockBatchItem {
                request: Some(request.clone()),
                ..Default::default()
            })
            .collect(),
    };
    let answer = svc
        .stock()
        .await
        .reserve_stock_batch(authed(batch))
        .await
        .expect("the batch is answered")
        .into_inner();
    answer.results.into_iter().map(Result::from).collect()
}

/// Ten units; asked 3, 4, 5, 2 and 1 in one batch. One by one in any order
/// the 5 cannot fit once 3 and 4 are taken and the 2 and the 1 always do:
/// the combined statement writes the 3 and the 4, the others are answered
/// alone. A line at a price the catalogue no longer has is refused.
async fn a_products_units_go_in_batch_order_and_the_rest_is_answered_alone(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 5, 200).await;
    let before = combined(&svc).await;
    let requests = [
        priced("APPLE", 3, 150),
        priced("APPLE", 4, 150),
        priced("APPLE", 5, 150),
        priced("APPLE", 2, 150),
        priced("APPLE", 1, 150),
        priced("PEAR", 1, 150),
    ];
    let outcomes = reserve_batch(&svc, &requests).await;
    for (i, quantity) in [(0, 3), (1, 4), (3, 2), (4, 1)] {
        let reply = outcomes[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("item {i}: {e:?}"));
        assert_eq!(reply.lines.len(), 1);
        assert_eq!(reply.lines[0].quantity, quantity);
        assert_eq!(reply.total_cents, 150 * quantity);
    }
    assert_refused(&outcomes[2], Code::FailedPrecondition, Reason::OutOfStock);
    assert_refused(&outcomes[5], Code::FailedPrecondition, Reason::PriceChanged);
    assert_eq!(
        levels(&mut client, "APPLE").await,
        (0, 10),
        "all sold, none twice"
    );
    assert_eq!(levels(&mut client, "PEAR").await, (5, 0));
    assert_combined(backend, before, combined(&svc).await, 2.0);

    // The batch again: every answer is the stored one, nothing more taken.
    let again = reserve_batch(&svc, &requests).await;
    for (i, (first, second)) in outcomes.iter().zip(&again).enumerate() {
        match (first, second) {
            (Ok(first), Ok(second)) => assert_eq!(first, second, "item {i}"),
            (Err(first), Err(second)) => {
                assert_eq!(first.code(), second.code(), "item {i}");
                assert_eq!(first.message(), second.message(), "item {i}");
            }
            other => panic!("item {i} answered otherwise: {other:?}"),
        }
    }
    assert_eq!(levels(&mut client, "APPLE").await, (0, 10));
}

async fn balance(svc: &services::Running, customer: &str) -> i64 {
    svc.payment()
        .await
        .get_account(authed(GetAccountRequest {
            customer_id: customer.into(),
        }))
        .await
        .expect("the account")
        .into_inner()
        .account
        .expect("an account")
        .balance_cents
}

fn charge(customer: &str, cents: i64) -> ChargeRequest {
    ChargeRequest {
        request_id: request_id(),
        order_id: order_id(),
        customer_id: customer.into(),
        amount_cents: cents,
        currency: "EUR".into(),
    }
}

async fn charge_batch(
    svc: &services::Running,
    requests: &[ChargeRequest],
) -> Vec<Result<ChargeResponse, Status>> {
    let batch = ChargeBatchRequest {
        items: requests
            .iter()
            .map(|request| ChargeBatchItem {
                request: Some(request.clone()),
                ..Default::default()
            })
            .collect(),
    };
    let answer = svc
        .payment()
        .await
        .charge_batch(authed(batch))
        .await
        .expect("the batch is answered")
        .into_inner();
    answer.results.into_iter().map(Result::from).collect()
}

/// 100 cents; charges of 30, 50, 40 and 20 in one batch, and one of a
/// customer with no account. The 30 and the 50 are written together, each
/// reply with the balance after its own debit (70, then 20); the 40 can
/// never fit then, and the 20 always does, to 0.
async fn an_accounts_funds_go_in_batch_order_each_reply_with_its_own_balance(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    client
        .deposit(admin(DepositRequest {
            request_id: request_id(),
            customer_id: "carol".into(),
            amount_cents: 100,
            currency: "EUR".into(),
        }))
        .await
        .unwrap();
    let before = combined(&svc).await;
    let requests = [
        charge("carol", 30),
        charge("carol", 50),
        charge("carol", 40),
        charge("carol", 20),
        charge("nobody", 10),
    ];
    let outcomes = charge_batch(&svc, &requests).await;
    let balances: Vec<Option<i64>> = outcomes
        .iter()
        .map(|o| o.as_ref().ok().map(|r| r.balance_cents))
        .collect();
    assert_eq!(
        balances,
        [Some(70), Some(20), None, Some(0), None],
        "{outcomes:?}"
    );
    assert_refused(
        &outcomes[2],
        Code::FailedPrecondition,
        Reason::InsufficientFunds,
    );
    assert_refused(&outcomes[4], Code::NotFound, Reason::UnknownAccount);
    assert_eq!(balance(&svc, "carol").await, 0);
    assert_combined(backend, before, combined(&svc).await, 2.0);

    // The batch again: the stored replies, balances and all, byte for byte.
    let again = charge_batch(&svc, &requests).await;
    for (i, (first, second)) in outcomes.iter().zip(&again).enumerate() {
        match (first, second) {
            (Ok(first), Ok(second)) => assert_eq!(first, second, "item {i}"),
            (Err(first), Err(second)) => assert_eq!(first.code(), second.code(), "item {i}"),
            other => panic!("item {i} answered otherwise: {other:?}"),
        }
    }
    assert_eq!(balance(&svc, "carol").await, 0, "nothing charged twice");
}

fn prepare(order_id: &str) -> PrepareShipmentRequest {
    PrepareShipmentRequest {
        request_id: request_id(),
        order_id: order_id.into(),
        address: Some(Address {
            recipient: "Ada Lovelace".into(),
            line1: "12 St James's Square".into(),
            city: "London".into(),
            postal_code: "SW1Y 4JH".into(),
            country: "DE".into(),
        }),
        service_level: 0,
        item_count: 2,
    }
}

/// One request twice in a batch is run once and answered twice alike; one
/// order asked by two requests gets one shipment, the other request is
/// refused. The batch's other requests go together; calls alone never do.
async fn an_order_or_a_request_twice_in_a_batch_counts_once(backend: Backend) {
    let svc = services::shipping(backend).await;
    // Calls alone, even at the same moment, are not combined.
    let before = combined(&svc).await;
    let (mut one, mut two) = (svc.shipping().await, svc.shipping().await);
    let (first, second) = tokio::join!(
        one.prepare_shipment(authed(prepare(&order_id()))),
        two.prepare_shipment(authed(prepare(&order_id()))),
    );
    first.expect("the first call alone");
    second.expect("the second call alone");
    assert_eq!(combined(&svc).await, before, "calls alone were combined");

    let twice = prepare(&order_id());
    let shared_order = order_id();
    let requests = [
        twice.clone(),
        twice,
        prepare(&shared_order),
        prepare(&shared_order),
        prepare(&order_id()),
        prepare(&order_id()),
    ];
    let outcomes = prepare_batch(&svc, &requests).await;
    let shipment = |i: usize| {
        outcomes[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("item {i}: {e:?}"))
            .shipment
            .clone()
            .unwrap()
    };
    assert_eq!(shipment(0), shipment(1), "one request, one shipment");
    let (won, lost) = match (&outcomes[2], &outcomes[3]) {
        (Ok(_), Err(_)) => (2, 3),
        (Err(_), Ok(_)) => (3, 2),
        other => panic!("one order, one shipment: {other:?}"),
    };
    assert_refused(
        &outcomes[lost],
        Code::FailedPrecondition,
        Reason::AlreadyPrepared,
    );
    assert_eq!(shipment(won).order_id, shared_order);
    for i in [4, 5] {
        assert_eq!(shipment(i).order_id, requests[i].order_id);
    }
    assert_combined(backend, before, combined(&svc).await, 2.0);
}

async fn prepare_batch(
    svc: &services::Running,
    requests: &[PrepareShipmentRequest],
) -> Vec<Result<PrepareShipmentResponse, Status>> {
    prepare_batch_on(svc.shipping().await, requests.to_vec())
        .await
        .expect("the batch is answered")
}

/// The batch of `requests` through `client`: each item's reply or status.
async fn prepare_batch_on(
    mut client: ShippingServiceClient<tonic::transport::Channel>,
    requests: Vec<PrepareShipmentRequest>,
) -> Result<Vec<Result<PrepareShipmentResponse, Status>>, Status> {
    let batch = PrepareShipmentBatchRequest {
        items: requests
            .into_iter()
            .map(|request| PrepareShipmentBatchItem {
                request: Some(request),
                ..Default::default()
            })
            .collect(),
    };
    Ok(client
        .prepare_shipment_batch(authed(batch))
        .await?
        .into_inner()
        .results
        .into_iter()
        .map(Result::from)
        .collect())
}

/// The second request of a batch of three is claimed by another process
/// (its refusal stored) while the combined statement runs: the statement's
/// claim waits on the other's, then fails when it commits. Nothing of the
/// statement stays; each request is answered alone: the first and the
/// third are prepared, the second gets the other process's answer.
async fn a_raced_combined_statement(backend: Backend) {
    let svc = services::shipping(backend).await;
    let pool = svc.db.pool().await;
    let before = combined(&svc).await;
    let requests = [
        prepare(&order_id()),
        prepare(&order_id()),
        prepare(&order_id()),
    ];
    let theirs = stored_refusal(
        "PrepareShipment",
        &requests[1],
        "refused by the other process",
    );
    let client = svc.shipping().await;
    let outcomes = race_alone(
        &pool,
        &theirs,
        &requests[1].request_id.clone(),
        prepare_batch_on(client, requests.to_vec()),
    )
    .await
    .expect("the batch is answered");
    for i in [0, 2] {
        let shipment = outcomes[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("item {i}: {e:?}"))
            .shipment
            .clone()
            .unwrap();
        assert_eq!(shipment.order_id, requests[i].order_id);
    }
    let theirs = outcomes[1]
        .as_ref()
        .expect_err("the other process's refusal");
    assert_eq!(theirs.code(), Code::FailedPrecondition, "{theirs:?}");
    assert!(
        theirs.message().contains("refused by the other process"),
        "{theirs:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shipments")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2, "the second request's shipment was written");
    assert_eq!(
        combined(&svc).await,
        before,
        "the failed statement counted requests as combined"
    );
    // Their replays are the stored answers.
    let again = prepare_batch(&svc, &requests).await;
    assert_eq!(again[0].as_ref().unwrap(), outcomes[0].as_ref().unwrap());
    assert_eq!(again[2].as_ref().unwrap(), outcomes[2].as_ref().unwrap());
    assert!(again[1].is_err());
}
