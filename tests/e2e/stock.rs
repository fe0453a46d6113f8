//! The stock service: idempotent reservations, releases that overtake them,
//! no oversell, and validation.

use ordersaga_proto::stock::v1::{
    GetProductRequest, ListProductsRequest, OrderLine, ReleaseStockRequest, ReserveStockRequest,
    RestockRequest, stock_service_client::StockServiceClient,
};
use ordersaga_tests::{Backend, admin, authed, services};
use tonic::{Code, transport::Channel};

use crate::{
    assertions::{
        assert_status, in_a_batch_after, order_id, race_alone, race_in_a_batch, request_id,
    },
    metrics::sample,
};

on_both_stores!(
    a_reservation_at_a_price_the_catalogue_no_longer_has_is_refused,
    a_retry_that_adds_the_expected_price_replays_the_reservation,
    repeated_reserve_returns_the_same_reply_and_reserves_once,
    reused_request_id_with_another_payload_is_refused,
    release_before_reserve_refuses_the_late_reserve,
    release_returns_stock_once,
    reservation_is_all_or_nothing,
    a_refusal_after_part_of_the_effect_is_stored_without_it,
    business_refusals_have_precise_codes_and_are_replayed,
    no_oversell_under_64_concurrent_callers,
    each_invalid_field_is_named_and_nothing_is_written,
    products_are_listed_in_pages,
    a_release_gives_back_every_lines_stock_once,
);

pub async fn seed(client: &mut StockServiceClient<Channel>, sku: &str, quantity: i64, price: i64) {
    client
        .restock(admin(RestockRequest {
            request_id: request_id(),
            sku: sku.into(),
            quantity,
            name: format!("Product {sku}"),
            unit_price_cents: price,
            currency: "EUR".into(),
        }))
        .await
        .expect("restock");
}

pub async fn levels(client: &mut StockServiceClient<Channel>, sku: &str) -> (i64, i64) {
    let product = client
        .get_product(authed(GetProductRequest { sku: sku.into() }))
        .await
        .expect("get product")
        .into_inner()
        .product
        .unwrap();
    (product.available, product.reserved)
}

fn reserve(request_id: &str, order_id: &str, lines: &[(&str, i64)]) -> ReserveStockRequest {
    ReserveStockRequest {
        request_id: request_id.into(),
        order_id: order_id.into(),
        lines: lines
            .iter()
            .map(|(sku, quantity)| OrderLine {
                sku: (*sku).into(),
                quantity: *quantity,
                ..Default::default()
            })
            .collect(),
    }
}

/// A one-line reservation that states the price the order was priced at.
fn priced(
    request_id: &str,
    order_id: &str,
    sku: &str,
    cents: i64,
    currency: &str,
) -> ReserveStockRequest {
    ReserveStockRequest {
        request_id: request_id.into(),
        order_id: order_id.into(),
        lines: vec![OrderLine {
            sku: sku.into(),
            quantity: 1,
            expected_unit_price_cents: cents,
            expected_currency: currency.into(),
        }],
    }
}

async fn a_reservation_at_a_price_the_catalogue_no_longer_has_is_refused(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    // The price as the order was priced: taken.
    client
        .reserve_stock(authed(priced(
            &request_id(),
            &order_id(),
            "APPLE",
            150,
            "EUR",
        )))
        .await
        .expect("the catalogue's price is reserved");
    // A stale price, or another currency: refused, nothing taken, and the
    // refusal is replayed like any other.
    for (cents, currency) in [(120, "EUR"), (150, "USD")] {
        let request = priced(&request_id(), &order_id(), "APPLE", cents, currency);
        let refused = client.reserve_stock(authed(request.clone())).await;
        assert_status(
            refused,
            Code::FailedPrecondition,
            &["price changed", "APPLE", "150 EUR"],
        );
        let replayed = client.reserve_stock(authed(request)).await;
        assert_status(replayed, Code::FailedPrecondition, &["price changed"]);
    }
    assert_eq!(levels(&mut client, "APPLE").await, (9, 1));
}

/// An orchestrator of the build before the price check reserved without an
/// expected price; after an upgrade it retries the same request_id with one.
/// That is the same request: the stored reservation is replayed, not refused
/// as a reused request_id (which would end the saga with the stock held).
async fn a_retry_that_adds_the_expected_price_replays_the_reservation(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let (rid, order) = (request_id(), order_id());
    let mut before_upgrade = priced(&rid, &order, "APPLE", 0, "");
    before_upgrade.lines[0].quantity = 2;
    let first = client
        .reserve_stock(authed(before_upgrade.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut after_upgrade = before_upgrade;
    after_upgrade.lines[0].expected_unit_price_cents = 150;
    after_upgrade.lines[0].expected_currency = "EUR".into();
    let again = client
        .reserve_stock(authed(after_upgrade))
        .await
        .expect("the same request, with its price stated, is replayed")
        .into_inner();
    assert_eq!(again, first);
    assert_eq!(levels(&mut client, "APPLE").await, (8, 2));
}

async fn repeated_reserve_returns_the_same_reply_and_reserves_once(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 10, 99).await;

    let request = reserve(&request_id(), &order_id(), &[("APPLE", 3), ("PEAR", 2)]);
    let first = client
        .reserve_stock(authed(request.clone()))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .reserve_stock(authed(request))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(first, second, "a repeat must return the stored reply");
    assert_eq!(first.total_cents, 3 * 150 + 2 * 99);
    assert_eq!(first.currency, "EUR");
    assert_eq!(levels(&mut client, "APPLE").await, (7, 3));
    assert_eq!(levels(&mut client, "PEAR").await, (8, 2));
    let pool = svc.db.pool().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reservation_lines")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2, "one effect only");
}

async fn reused_request_id_with_another_payload_is_refused(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let rid = request_id();
    let order = order_id();
    client
        .reserve_stock(authed(reserve(&rid, &order, &[("APPLE", 1)])))
        .await
        .unwrap();

    let changed = client
        .reserve_stock(authed(reserve(&rid, &order, &[("APPLE", 2)])))
        .await;
    assert_status(
        changed,
        Code::InvalidArgument,
        &["request_id", &rid, "different"],
    );
    // The same request_id on another method is refused too.
    let other_method = client
        .release_stock(authed(ReleaseStockRequest {
            request_id: rid.clone(),
            order_id: order,
        }))
        .await;
    assert_status(other_method, Code::InvalidArgument, &["request_id"]);
    assert_eq!(levels(&mut client, "APPLE").await, (9, 1));
}

async fn release_before_reserve_refuses_the_late_reserve(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let order = order_id();

    let released = client
        .release_stock(authed(ReleaseStockRequest {
            request_id: request_id(),
            order_id: order.clone(),
        }))
        .await
        .expect("a release with nothing reserved succeeds")
        .into_inner();
    assert!(!released.released_reservation);

    let late = client
        .reserve_stock(authed(reserve(&request_id(), &order, &[("APPLE", 4)])))
        .await;
    assert_status(
        late,
        Code::FailedPrecondition,
        &["released before it was reserved"],
    );
    assert_eq!(
        levels(&mut client, "APPLE").await,
        (10, 0),
        "the late reserve took nothing"
    );
}

async fn release_returns_stock_once(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let order = order_id();
    client
        .reserve_stock(authed(reserve(&request_id(), &order, &[("APPLE", 4)])))
        .await
        .unwrap();
    assert_eq!(levels(&mut client, "APPLE").await, (6, 4));

    let release = ReleaseStockRequest {
        request_id: request_id(),
        order_id: order.clone(),
    };
    let first = client
        .release_stock(authed(release.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.released_reservation);
    let repeat = client
        .release_stock(authed(release))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, repeat);
    // A second release under a new request_id is a no-op too.
    let again = client
        .release_stock(authed(ReleaseStockRequest {
            request_id: request_id(),
            order_id: order,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.released_reservation);
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0));
}

async fn reservation_is_all_or_nothing(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 1, 99).await;

    let result = client
        .reserve_stock(authed(reserve(
            &request_id(),
            &order_id(),
            &[("APPLE", 5), ("PEAR", 2)],
        )))
        .await;
    assert_status(
        result,
        Code::FailedPrecondition,
        &["out of stock", "PEAR", "1 available", "2 requested"],
    );
    assert_eq!(
        levels(&mut client, "APPLE").await,
        (10, 0),
        "the good line was rolled back"
    );
    assert_eq!(levels(&mut client, "PEAR").await, (1, 0));
    let pool = svc.db.pool().await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reservations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

/// A refusal that comes after the effect wrote part of its rows (the first
/// line taken, then the second short) is stored as the request's answer
/// without those rows: a retry after a restock gets the same refusal, and
/// still takes nothing.
async fn a_refusal_after_part_of_the_effect_is_stored_without_it(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 1, 99).await;
    let refused = reserve(&request_id(), &order_id(), &[("APPLE", 5), ("PEAR", 2)]);
    let out_of_stock = ["out of stock", "PEAR", "1 available", "2 requested"];

    let first = client.reserve_stock(authed(refused.clone())).await;
    assert_status(first, Code::FailedPrecondition, &out_of_stock);
    seed(&mut client, "PEAR", 5, 99).await;
    let retried = client.reserve_stock(authed(refused.clone())).await;
    assert_status(retried, Code::FailedPrecondition, &out_of_stock);

    assert_eq!(levels(&mut client, "APPLE").await, (10, 0));
    assert_eq!(levels(&mut client, "PEAR").await, (6, 0));
    let pool = svc.db.pool().await;
    let stored: Vec<(String, Option<i64>)> = sqlx::query_as(
        "SELECT method, CAST(status_code AS BIGINT) FROM idempotency WHERE request_id = $1",
    )
    .bind(&refused.request_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        vec![(
            "ReserveStock".to_owned(),
            Some(Code::FailedPrecondition as i64)
        )],
        "one row: the claim with its refusal"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reservations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "no reservation row left by the refused effect");
}

async fn business_refusals_have_precise_codes_and_are_replayed(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 1, 150).await;

    let unknown = client
        .reserve_stock(authed(reserve(&request_id(), &order_id(), &[("KIWI", 1)])))
        .await;
    assert_status(unknown, Code::NotFound, &["KIWI"]);
    let unknown_product = client
        .get_product(authed(GetProductRequest { sku: "KIWI".into() }))
        .await;
    assert_status(unknown_product, Code::NotFound, &["KIWI"]);

    // A refusal is the request's answer for good: after a restock, the same
    // request_id still gets it, while a new request_id succeeds.
    let refused = reserve(&request_id(), &order_id(), &[("APPLE", 2)]);
    assert_status(
        client.reserve_stock(authed(refused.clone())).await,
        Code::FailedPrecondition,
        &["out of stock"],
    );
    seed(&mut client, "APPLE", 5, 150).await;
    assert_status(
        client.reserve_stock(authed(refused.clone())).await,
        Code::FailedPrecondition,
        &["out of stock"],
    );
    let mut fresh = refused;
    fresh.request_id = request_id();
    client
        .reserve_stock(authed(fresh))
        .await
        .expect("a new request_id is a new request");

    let incomplete = client
        .restock(admin(RestockRequest {
            request_id: request_id(),
            sku: "NEW".into(),
            quantity: 1,
            ..Default::default()
        }))
        .await;
    assert_status(incomplete, Code::NotFound, &["NEW", "name"]);
}

async fn no_oversell_under_64_concurrent_callers(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "HOT", 50, 100).await;

    let channel = svc.channel().await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut client = StockServiceClient::new(channel.clone());
            tokio::spawn(async move {
                client
                    .reserve_stock(authed(reserve(&request_id(), &order_id(), &[("HOT", 1)])))
                    .await
            })
        })
        .collect();
    let results = futures::future::join_all(tasks).await;
    let mut ok = 0;
    for result in results {
        match result.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert_eq!(ok, 50, "exactly the stock on hand is sold");
    assert_eq!(levels(&mut client, "HOT").await, (0, 50));
}

async fn each_invalid_field_is_named_and_nothing_is_written(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let rid = request_id();
    let good = reserve(&rid, &order_id(), &[("APPLE", 1)]);

    let too_many: Vec<(String, i64)> = (0..101).map(|i| (format!("SKU{i}"), 1)).collect();
    let cases: Vec<(&str, ReserveStockRequest)> = vec![
        (
            "request_id",
            ReserveStockRequest {
                request_id: String::new(),
                ..good.clone()
            },
        ),
        (
            "request_id",
            ReserveStockRequest {
                request_id: "x".repeat(129),
                ..good.clone()
            },
        ),
        (
            "order_id",
            ReserveStockRequest {
                order_id: String::new(),
                ..good.clone()
            },
        ),
        (
            "order_id",
            ReserveStockRequest {
                order_id: "not-a-uuid".into(),
                ..good.clone()
            },
        ),
        (
            "lines",
            ReserveStockRequest {
                lines: vec![],
                ..good.clone()
            },
        ),
        (
            "lines",
            ReserveStockRequest {
                lines: too_many
                    .iter()
                    .map(|(s, q)| OrderLine {
                        sku: s.clone(),
                        quantity: *q,
                        ..Default::default()
                    })
                    .collect(),
                ..good.clone()
            },
        ),
        ("lines[0].sku", reserve(&rid, &good.order_id, &[("", 1)])),
        (
            "lines[0].sku",
            reserve(&rid, &good.order_id, &[("bad sku!", 1)]),
        ),
        (
            "lines[0].quantity",
            reserve(&rid, &good.order_id, &[("APPLE", 0)]),
        ),
        (
            "lines[0].quantity",
            reserve(&rid, &good.order_id, &[("APPLE", -3)]),
        ),
        (
            "lines[0].quantity",
            reserve(&rid, &good.order_id, &[("APPLE", 1_000_000_000)]),
        ),
        (
            "lines[1].sku",
            reserve(&rid, &good.order_id, &[("APPLE", 1), ("APPLE", 2)]),
        ),
        (
            "lines[0].expected_unit_price_cents",
            priced(&rid, &good.order_id, "APPLE", -5, "EUR"),
        ),
        (
            "lines[0].expected_currency",
            priced(&rid, &good.order_id, "APPLE", 150, "euro"),
        ),
        (
            "lines[0].expected_currency",
            priced(&rid, &good.order_id, "APPLE", 0, "EUR"),
        ),
    ];
    for (field, request) in cases {
        let result = client.reserve_stock(authed(request)).await;
        assert_status(result, Code::InvalidArgument, &[field]);
    }
    let bad_restock = client
        .restock(admin(RestockRequest {
            request_id: request_id(),
            sku: "NEW".into(),
            quantity: 5,
            name: "New".into(),
            unit_price_cents: 100,
            currency: "euro".into(),
        }))
        .await;
    assert_status(bad_restock, Code::InvalidArgument, &["currency"]);
    let bad_page = client
        .list_products(authed(ListProductsRequest {
            page_size: -1,
            page_token: String::new(),
        }))
        .await;
    assert_status(bad_page, Code::InvalidArgument, &["page_size"]);

    // Nothing was written: stock is untouched and the request_id is still unused.
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0));
    client
        .reserve_stock(authed(good))
        .await
        .expect("the corrected request goes through");
}

async fn products_are_listed_in_pages(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    for sku in ["A1", "A2", "A3", "A4", "A5"] {
        seed(&mut client, sku, 1, 10).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_products(authed(ListProductsRequest {
                page_size: 2,
                page_token: token,
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.products.len() <= 2);
        seen.extend(page.products.into_iter().map(|p| p.sku));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["A1", "A2", "A3", "A4", "A5"]);
}

/// PostgreSQL: the order's reservation made and committed by another
/// connection (a second stock process) while this one's statement took the
/// stock. The statement writes all its parts or none, and a refusal takes
/// back nothing, so this one case must not pass for a refusal: its request
/// is answered UNAVAILABLE with the stock given back, and its retry hears
/// the reservation that won. A request before it in its batch (held up by
/// another lock until it has queued; a reservation at no stated price,
/// which may write before it refuses, so that it takes its turn in a batch
/// rather than run alone) runs again, and counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_raced_by_another_connection_takes_no_stock() {
    let svc = services::stock(Backend::Postgres).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 10, 99).await;
    let order = order_id();
    let pool = svc.db.pool().await;
    let request = priced(&request_id(), &order, "APPLE", 150, "EUR");
    let (before, raced) = race_in_a_batch(
        &pool,
        HOLD_PEAR,
        "INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
         VALUES ($1, 'theirs', 'reserved', 0, 'EUR', 0, 0)",
        &order,
        reserve_a_pear(&client),
        {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.reserve_stock(authed(request)).await }
        },
    )
    .await;
    assert_eq!(
        levels(&mut client, "APPLE").await,
        (10, 0),
        "stock was taken"
    );
    assert_status(raced, Code::Unavailable, &["unavailable, retry"]);
    before.expect("the request before");
    assert_eq!(levels(&mut client, "PEAR").await, (9, 1));
    assert_status(
        client.reserve_stock(authed(request)).await,
        Code::FailedPrecondition,
        &["already holds reservation theirs"],
    );
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0));
}

/// PostgreSQL: a request alone in the service commits with its one
/// statement, outside the shared transaction, so nothing can roll back a
/// part of it. The order's reservation made and committed by another
/// connection while this statement took the stock must fail the statement
/// whole: no stock is taken, and the request hears the reservation that
/// won. (Seen failing while the reservation's insert did nothing on a
/// conflict: the stock stayed taken, (9, 1).)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_reservation_raced_by_another_connection_takes_no_stock() {
    let svc = services::stock(Backend::Postgres).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let order = order_id();
    let pool = svc.db.pool().await;
    let request = priced(&request_id(), &order, "APPLE", 150, "EUR");
    let mut sending = client.clone();
    let raced = race_alone(
        &pool,
        "INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
         VALUES ($1, 'theirs', 'reserved', 0, 'EUR', 0, 0)",
        &order,
        {
            let request = request.clone();
            async move { sending.reserve_stock(authed(request)).await }
        },
    )
    .await;
    assert_eq!(
        levels(&mut client, "APPLE").await,
        (10, 0),
        "stock was taken"
    );
    assert_status(
        raced,
        Code::FailedPrecondition,
        &["already holds reservation theirs"],
    );
}

/// PostgreSQL: a lone release whose order's reservation another connection
/// writes and commits while the release waits to write the order's
/// tombstone. The release must see that reservation and give its stock
/// back: answered "nothing to release", the stock would stay reserved for
/// good. (A release is one statement, whose snapshot predates the other's
/// commit: it writes nothing then, and runs again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_release_raced_by_a_reservation_of_another_connection_gives_its_stock_back() {
    let svc = services::stock(Backend::Postgres).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    let order = order_id();
    let pool = svc.db.pool().await;
    let request = ReleaseStockRequest {
        request_id: request_id(),
        order_id: order.clone(),
    };
    let mut sending = client.clone();
    let released = race_alone(
        &pool,
        "WITH reservation AS ( \
           INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
           VALUES ($1, 'theirs', 'reserved', 450, 'EUR', 0, 0) RETURNING order_id), \
         line AS ( \
           INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) \
           SELECT order_id, 'APPLE', 3, 150 FROM reservation) \
         UPDATE products SET available = available - 3, reserved = reserved + 3 WHERE sku = 'APPLE'",
        &order,
        {
            let request = request.clone();
            async move { sending.release_stock(authed(request)).await }
        },
    )
    .await;
    assert!(
        released.unwrap().into_inner().released_reservation,
        "the reservation that won was not released"
    );
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0), "stock kept");
    let again = client.release_stock(authed(request)).await.unwrap();
    assert!(again.into_inner().released_reservation, "a replay differs");
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0));
}

/// A reservation of several products, released: each product's units come
/// back, once (on PostgreSQL in the release's one statement).
async fn a_release_gives_back_every_lines_stock_once(backend: Backend) {
    let svc = services::stock(backend).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 5, 90).await;
    let order = order_id();
    client
        .reserve_stock(authed(reserve(
            &request_id(),
            &order,
            &[("APPLE", 4), ("PEAR", 5)],
        )))
        .await
        .unwrap();
    assert_eq!(levels(&mut client, "PEAR").await, (0, 5));
    let release = ReleaseStockRequest {
        request_id: request_id(),
        order_id: order,
    };
    for _ in 0..2 {
        let released = client
            .release_stock(authed(release.clone()))
            .await
            .unwrap()
            .into_inner();
        assert!(released.released_reservation);
    }
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0));
    assert_eq!(levels(&mut client, "PEAR").await, (5, 0));
}

/// A lock on the PEAR's row, which [`reserve_a_pear`] waits on.
const HOLD_PEAR: &str = "SELECT sku FROM products WHERE sku = 'PEAR' FOR UPDATE";

/// A reservation of one PEAR for a new order, whose turn may write before
/// it refuses (an unpriced line): it cannot run alone.
fn reserve_a_pear(
    client: &StockServiceClient<Channel>,
) -> impl Future<
    Output = Result<
        tonic::Response<ordersaga_proto::stock::v1::ReserveStockResponse>,
        tonic::Status,
    >,
> + Send
+ 'static {
    let mut client = client.clone();
    async move {
        client
            .reserve_stock(authed(reserve(&request_id(), &order_id(), &[("PEAR", 1)])))
            .await
    }
}

/// Requests run again on the stock service's shared transaction, from its
/// `/metrics`.
async fn turns_redone(svc: &services::Running) -> f64 {
    sample(
        &svc.scrape().await,
        "db_shared_transaction_turns_redone_total",
    )
}

/// PostgreSQL: a release sent again (its first reply lost) in a batch of
/// the shared transaction, behind a reservation. Its statement finds its
/// claim and writes nothing: it is answered as the first was, and its
/// neighbour's turn is not undone. (Answered with an error instead, the
/// repeat rolled its batch back and the reservation ran again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_repeated_in_a_batch_is_answered_as_the_first_and_undoes_no_neighbour() {
    let svc = services::stock(Backend::Postgres).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 10, 99).await;
    let order = order_id();
    client
        .reserve_stock(authed(reserve(&request_id(), &order, &[("APPLE", 4)])))
        .await
        .unwrap();
    let release = ReleaseStockRequest {
        request_id: request_id(),
        order_id: order,
    };
    let first = client
        .release_stock(authed(release.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.released_reservation);
    let redone = turns_redone(&svc).await;
    let pool = svc.db.pool().await;
    let (before, again) = in_a_batch_after(&pool, HOLD_PEAR, reserve_a_pear(&client), {
        let mut client = client.clone();
        async move { client.release_stock(authed(release)).await }
    })
    .await;
    assert_eq!(again.unwrap().into_inner(), first);
    before.expect("the reservation before");
    assert_eq!(turns_redone(&svc).await, redone, "a neighbour ran again");
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0));
    assert_eq!(levels(&mut client, "PEAR").await, (9, 1));
}

/// PostgreSQL: a release in a batch of the shared transaction whose
/// order's reservation another connection writes and commits while the
/// release waits to write the order's tombstone: the release runs its
/// statement again in the batch, sees the reservation and gives its stock
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_in_a_batch_raced_by_a_reservation_of_another_connection_gives_its_stock_back() {
    let svc = services::stock(Backend::Postgres).await;
    let mut client = svc.stock().await;
    seed(&mut client, "APPLE", 10, 150).await;
    seed(&mut client, "PEAR", 10, 99).await;
    let order = order_id();
    let pool = svc.db.pool().await;
    let release = ReleaseStockRequest {
        request_id: request_id(),
        order_id: order.clone(),
    };
    let (before, released) = race_in_a_batch(
        &pool,
        HOLD_PEAR,
        "WITH reservation AS ( \
           INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
           VALUES ($1, 'theirs', 'reserved', 450, 'EUR', 0, 0) RETURNING order_id), \
         line AS ( \
           INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) \
           SELECT order_id, 'APPLE', 3, 150 FROM reservation) \
         UPDATE products SET available = available - 3, reserved = reserved + 3 WHERE sku = 'APPLE'",
        &order,
        reserve_a_pear(&client),
        {
            let mut client = client.clone();
            async move { client.release_stock(authed(release)).await }
        },
    )
    .await;
    before.expect("the reservation before");
    assert!(
        released.unwrap().into_inner().released_reservation,
        "the reservation that won was not released"
    );
    assert_eq!(levels(&mut client, "APPLE").await, (10, 0), "stock kept");
    assert_eq!(levels(&mut client, "PEAR").await, (9, 1));
}
