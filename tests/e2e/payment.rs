//! The payment service: idempotent charges, refunds that overtake them, no
//! overdraw, and validation.

use ordersaga_proto::payment::v1::{
    ChargeRequest, DepositRequest, GetAccountRequest, RefundRequest,
    payment_service_client::PaymentServiceClient,
};
use ordersaga_tests::{Backend, admin, authed, services};
use tonic::{Code, transport::Channel};

use crate::assertions::{
    assert_status, order_id, race_alone, race_in_a_batch, request_id, stored_refusal,
};

on_both_stores!(
    repeated_charge_returns_the_same_reply_and_debits_once,
    reused_request_id_with_another_payload_is_refused,
    refund_before_charge_refuses_the_late_charge,
    refund_returns_money_once,
    business_refusals_have_precise_codes,
    no_overdraw_under_64_concurrent_charges,
    each_invalid_field_is_named_and_nothing_is_written,
    each_refusal_reads_its_cause_and_writes_nothing,
);

async fn open(client: &mut PaymentServiceClient<Channel>, customer: &str, cents: i64) {
    client
        .deposit(admin(DepositRequest {
            request_id: request_id(),
            customer_id: customer.into(),
            amount_cents: cents,
            currency: "EUR".into(),
        }))
        .await
        .expect("deposit");
}

async fn balance(client: &mut PaymentServiceClient<Channel>, customer: &str) -> (i64, i64) {
    let account = client
        .get_account(authed(GetAccountRequest {
            customer_id: customer.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    (account.balance_cents, account.charged_cents)
}

fn charge(request_id: &str, order_id: &str, customer: &str, cents: i64) -> ChargeRequest {
    ChargeRequest {
        request_id: request_id.into(),
        order_id: order_id.into(),
        customer_id: customer.into(),
        amount_cents: cents,
        currency: "EUR".into(),
    }
}

async fn repeated_charge_returns_the_same_reply_and_debits_once(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let request = charge(&request_id(), &order_id(), "alice", 2_500);
    let first = client
        .charge(authed(request.clone()))
        .await
        .unwrap()
        .into_inner();
    let second = client.charge(authed(request)).await.unwrap().into_inner();
    assert_eq!(first, second);
    assert_eq!(first.balance_cents, 7_500);
    assert_eq!(balance(&mut client, "alice").await, (7_500, 2_500));
}

async fn reused_request_id_with_another_payload_is_refused(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let rid = request_id();
    let order = order_id();
    client
        .charge(authed(charge(&rid, &order, "alice", 100)))
        .await
        .unwrap();
    let changed = client
        .charge(authed(charge(&rid, &order, "alice", 200)))
        .await;
    assert_status(changed, Code::InvalidArgument, &["request_id", "different"]);
    assert_eq!(balance(&mut client, "alice").await, (9_900, 100));
}

async fn refund_before_charge_refuses_the_late_charge(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let order = order_id();
    let refunded = client
        .refund(authed(RefundRequest {
            request_id: request_id(),
            order_id: order.clone(),
        }))
        .await
        .expect("refunding nothing succeeds")
        .into_inner();
    assert!(!refunded.refunded_charge);
    let late = client
        .charge(authed(charge(&request_id(), &order, "alice", 100)))
        .await;
    assert_status(
        late,
        Code::FailedPrecondition,
        &["refunded before it was charged"],
    );
    assert_eq!(balance(&mut client, "alice").await, (10_000, 0));
}

async fn refund_returns_money_once(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let order = order_id();
    client
        .charge(authed(charge(&request_id(), &order, "alice", 4_000)))
        .await
        .unwrap();
    let refund = RefundRequest {
        request_id: request_id(),
        order_id: order.clone(),
    };
    let first = client
        .refund(authed(refund.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.refunded_charge);
    assert_eq!(first.amount_cents, 4_000);
    assert_eq!(
        client.refund(authed(refund)).await.unwrap().into_inner(),
        first
    );
    let again = client
        .refund(authed(RefundRequest {
            request_id: request_id(),
            order_id: order,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.refunded_charge);
    assert_eq!(balance(&mut client, "alice").await, (10_000, 0));
}

async fn business_refusals_have_precise_codes(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "poor", 500).await;
    let unknown = client
        .charge(authed(charge(&request_id(), &order_id(), "nobody", 100)))
        .await;
    assert_status(unknown, Code::NotFound, &["nobody"]);
    let unknown_account = client
        .get_account(authed(GetAccountRequest {
            customer_id: "nobody".into(),
        }))
        .await;
    assert_status(unknown_account, Code::NotFound, &["nobody"]);
    let poor = client
        .charge(authed(charge(&request_id(), &order_id(), "poor", 501)))
        .await;
    assert_status(
        poor,
        Code::FailedPrecondition,
        &["insufficient funds", "500", "501"],
    );
    let mut dollars = charge(&request_id(), &order_id(), "poor", 100);
    dollars.currency = "USD".into();
    assert_status(
        client.charge(authed(dollars)).await,
        Code::FailedPrecondition,
        &["currency", "EUR", "USD"],
    );
    assert_eq!(balance(&mut client, "poor").await, (500, 0));
}

async fn no_overdraw_under_64_concurrent_charges(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "shared", 1_000).await;
    let channel = svc.channel().await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut client = PaymentServiceClient::new(channel.clone());
            tokio::spawn(async move {
                client
                    .charge(authed(charge(&request_id(), &order_id(), "shared", 100)))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for result in futures::future::join_all(tasks).await {
        match result.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert_eq!(ok, 10, "exactly the funds on hand are charged");
    assert_eq!(balance(&mut client, "shared").await, (0, 1_000));
}

async fn each_invalid_field_is_named_and_nothing_is_written(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let good = charge(&request_id(), &order_id(), "alice", 100);
    let cases: Vec<(&str, ChargeRequest)> = vec![
        (
            "request_id",
            ChargeRequest {
                request_id: String::new(),
                ..good.clone()
            },
        ),
        (
            "request_id",
            ChargeRequest {
                request_id: "a\nb".into(),
                ..good.clone()
            },
        ),
        (
            "order_id",
            ChargeRequest {
                order_id: "zzz".into(),
                ..good.clone()
            },
        ),
        (
            "customer_id",
            ChargeRequest {
                customer_id: String::new(),
                ..good.clone()
            },
        ),
        (
            "customer_id",
            ChargeRequest {
                customer_id: "c".repeat(129),
                ..good.clone()
            },
        ),
        (
            "amount_cents",
            ChargeRequest {
                amount_cents: 0,
                ..good.clone()
            },
        ),
        (
            "amount_cents",
            ChargeRequest {
                amount_cents: -100,
                ..good.clone()
            },
        ),
        (
            "amount_cents",
            ChargeRequest {
                amount_cents: i64::MAX,
                ..good.clone()
            },
        ),
        (
            "currency",
            ChargeRequest {
                currency: "eur".into(),
                ..good.clone()
            },
        ),
        (
            "currency",
            ChargeRequest {
                currency: String::new(),
                ..good.clone()
            },
        ),
    ];
    for (field, request) in cases {
        assert_status(
            client.charge(authed(request)).await,
            Code::InvalidArgument,
            &[field],
        );
    }
    let bad_deposit = client
        .deposit(admin(DepositRequest {
            request_id: request_id(),
            customer_id: "bob".into(),
            amount_cents: 0,
            currency: "EUR".into(),
        }))
        .await;
    assert_status(bad_deposit, Code::InvalidArgument, &["amount_cents"]);
    assert_eq!(balance(&mut client, "alice").await, (10_000, 0));
    client
        .charge(authed(good))
        .await
        .expect("the corrected request goes through");
}

/// PostgreSQL: the order's charge made and committed by another connection
/// (a second payment process) while this one's statement debited the
/// account. The statement writes both or nothing, and a refusal takes back
/// nothing, so this one case must not pass for a refusal: its request is
/// answered UNAVAILABLE with the money given back, and its retry hears the
/// charge that won. A request before it in its batch (held up by another
/// lock until it has queued; a refund, which may write before it refuses,
/// so that it takes its turn in a batch rather than run alone) runs again,
/// and counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_raced_by_another_connection_debits_nothing() {
    let svc = services::payment(Backend::Postgres).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    open(&mut client, "bob", 10_000).await;
    let bobs = order_id();
    client
        .charge(authed(charge(&request_id(), &bobs, "bob", 1_000)))
        .await
        .unwrap();
    let order = order_id();
    let pool = svc.db.pool().await;
    let request = charge(&request_id(), &order, "alice", 2_500);
    let mut refunding = client.clone();
    let mut sending = client.clone();
    let (before, raced) = race_in_a_batch(
        &pool,
        "SELECT customer_id FROM accounts WHERE customer_id = 'bob' FOR UPDATE",
        "INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
         VALUES ($1, 'theirs', 'alice', 2500, 'EUR', 'charged', 0, 0)",
        &order,
        async move {
            refunding
                .refund(authed(RefundRequest {
                    request_id: request_id(),
                    order_id: bobs,
                }))
                .await
        },
        {
            let request = request.clone();
            async move { sending.charge(authed(request)).await }
        },
    )
    .await;
    assert_eq!(
        balance(&mut client, "alice").await.0,
        10_000,
        "alice was debited"
    );
    assert_status(raced, Code::Unavailable, &["unavailable, retry"]);
    assert!(
        before
            .expect("the request before")
            .into_inner()
            .refunded_charge
    );
    assert_eq!(balance(&mut client, "bob").await.0, 10_000, "bob's refund");
    assert_status(
        client.charge(authed(request)).await,
        Code::FailedPrecondition,
        &["already charged by payment theirs"],
    );
    assert_eq!(balance(&mut client, "alice").await.0, 10_000);
}

/// PostgreSQL: a charge writes its request's reply in its own statement,
/// appending the balance after the debit as protobuf would. The stored
/// reply is the returned one byte for byte, at a balance of 0 (a field
/// protobuf leaves out) and at balances whose varints take one byte or
/// several; and the statement's encoding is prost's for any balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charges_stored_reply_is_the_reply_it_returned_byte_for_byte() {
    use prost::Message;
    let svc = services::payment(Backend::Postgres).await;
    let mut client = svc.payment().await;
    let pool = svc.db.pool().await;
    for balance in [0_i64, 1, 127, 128, 300, 16_383, 16_384, 1 << 35, i64::MAX] {
        let appended: Vec<u8> = sqlx::query_scalar(
            "SELECT CASE WHEN $1 = 0 THEN ''::bytea ELSE '\\x20'::bytea || protobuf_varint($1) END",
        )
        .bind(balance)
        .fetch_one(&pool)
        .await
        .unwrap();
        let reply = ordersaga_proto::payment::v1::ChargeResponse {
            balance_cents: balance,
            ..Default::default()
        };
        assert_eq!(appended, reply.encode_to_vec(), "balance {balance}");
    }
    open(&mut client, "carol", 1_000 + 300 + 200).await;
    for (cents, left) in [(1_000, 500), (300, 200), (200, 0)] {
        let request = charge(&request_id(), &order_id(), "carol", cents);
        let reply = client
            .charge(authed(request.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.balance_cents, left);
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT reply FROM idempotency WHERE request_id = $1")
                .bind(&request.request_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(stored, reply.encode_to_vec(), "left {left}");
        let again = client.charge(authed(request)).await.unwrap().into_inner();
        assert_eq!(again, reply);
    }
}

/// PostgreSQL: a request alone in the service commits with its one
/// statement, outside the shared transaction, so nothing can roll back a
/// part of it. The order's charge made and committed by another connection
/// while this statement debited the account must fail the statement whole:
/// nothing is debited, and the request hears the charge that won. (Seen
/// failing while the charge's insert did nothing on a conflict: alice was
/// left debited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_charge_raced_by_another_connection_debits_nothing() {
    let svc = services::payment(Backend::Postgres).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let order = order_id();
    let pool = svc.db.pool().await;
    let request = charge(&request_id(), &order, "alice", 2_500);
    let mut sending = client.clone();
    let raced = race_alone(
        &pool,
        "INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
         VALUES ($1, 'theirs', 'alice', 2500, 'EUR', 'charged', 0, 0)",
        &order,
        async move { sending.charge(authed(request)).await },
    )
    .await;
    assert_eq!(
        balance(&mut client, "alice").await.0,
        10_000,
        "alice was debited"
    );
    assert_status(
        raced,
        Code::FailedPrecondition,
        &["already charged by payment theirs"],
    );
}

/// PostgreSQL: the same request's claim written and committed by another
/// connection (the request sent twice, to two payment processes; the other
/// refused it) while a lone one's statement debited the account: the
/// statement fails whole, and the request hears the answer that won.
/// (Seen failing while the claim's insert did nothing on a conflict: alice
/// was left debited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_charge_whose_claim_is_raced_debits_nothing() {
    let svc = services::payment(Backend::Postgres).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let pool = svc.db.pool().await;
    let id = request_id();
    let request = charge(&id, &order_id(), "alice", 2_500);
    let theirs = stored_refusal("Charge", &request, "refused by the other process");
    let mut sending = client.clone();
    let raced = race_alone(&pool, &theirs, &id, async move {
        sending.charge(authed(request)).await
    })
    .await;
    assert_eq!(
        balance(&mut client, "alice").await.0,
        10_000,
        "alice was debited"
    );
    assert_status(
        raced,
        Code::FailedPrecondition,
        &["refused by the other process"],
    );
}

/// PostgreSQL: a lone charge refused because another connection drained
/// the account while its statement waited on the account's row. The
/// refusal is stored for good, so it must tell the balance that refused
/// it, not the one the statement's snapshot held (10,000: enough). (The
/// statement reads what stood in its way in the same round trip; a
/// refusal that those reads cannot explain is checked again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_charge_refused_by_a_balance_another_connection_drained_tells_that_balance() {
    let svc = services::payment(Backend::Postgres).await;
    let mut client = svc.payment().await;
    open(&mut client, "alice", 10_000).await;
    let pool = svc.db.pool().await;
    let request = charge(&request_id(), &order_id(), "alice", 2_500);
    let mut sending = client.clone();
    let refused = race_alone(
        &pool,
        "UPDATE accounts SET balance_cents = 400 WHERE customer_id = $1",
        "alice",
        {
            let request = request.clone();
            async move { sending.charge(authed(request)).await }
        },
    )
    .await;
    assert_status(
        refused,
        Code::FailedPrecondition,
        &["insufficient funds", "has 400 cents", "2500"],
    );
    assert_eq!(balance(&mut client, "alice").await.0, 400);
    assert_status(
        client.charge(authed(request)).await,
        Code::FailedPrecondition,
        &["has 400 cents"],
    );
}

/// A charge refused for each reason, and a charge of an order charged
/// before: each refusal names its cause (on PostgreSQL, read by the
/// charge's own statement), and none writes anything.
async fn each_refusal_reads_its_cause_and_writes_nothing(backend: Backend) {
    let svc = services::payment(backend).await;
    let mut client = svc.payment().await;
    open(&mut client, "poor", 500).await;
    let order = order_id();
    client
        .charge(authed(charge(&request_id(), &order, "poor", 200)))
        .await
        .unwrap();
    assert_status(
        client
            .charge(authed(charge(&request_id(), &order, "poor", 100)))
            .await,
        Code::FailedPrecondition,
        &["already charged by payment"],
    );
    let refunded = order_id();
    client
        .refund(authed(RefundRequest {
            request_id: request_id(),
            order_id: refunded.clone(),
        }))
        .await
        .unwrap();
    assert_status(
        client
            .charge(authed(charge(&request_id(), &refunded, "poor", 100)))
            .await,
        Code::FailedPrecondition,
        &["refunded before it was charged"],
    );
    assert_status(
        client
            .charge(authed(charge(&request_id(), &order_id(), "poor", 301)))
            .await,
        Code::FailedPrecondition,
        &["insufficient funds", "has 300 cents", "301"],
    );
    assert_status(
        client
            .charge(authed(charge(&request_id(), &order_id(), "nobody", 1)))
            .await,
        Code::NotFound,
        &["unknown account \"nobody\""],
    );
    assert_eq!(balance(&mut client, "poor").await.0, 300);
}
