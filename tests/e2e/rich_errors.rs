//! Rich errors: every refusal carries, besides its message, a stable reason
//! (`google.rpc.ErrorInfo`) and, for a malformed field, its path
//! (`google.rpc.BadRequest`), read here through the Rust SDK's typed
//! `ordersaga_proto::errors`. Each reason is provoked for real; a replay of
//! a stored refusal answers with the same details.

use ordersaga_proto::{
    errors::{Reason, field_violations, refusal},
    orders::v1::{
        CancelOrderRequest, GetOrderRequest, OrderStatus, ResolveCompensationRequest,
        RetryCompensationRequest, order_service_client::OrderServiceClient,
    },
    payment::v1::{ChargeRequest, GetPaymentRequest, RefundRequest},
    shipping::v1::{Address, CancelShipmentRequest, GetShipmentRequest, PrepareShipmentRequest},
    stock::v1::{
        GetProductRequest, GetReservationRequest, OrderLine, ReleaseStockRequest,
        ReserveStockRequest, RestockRequest,
    },
};
use ordersaga_tests::{Backend, admin, authed, system::order};
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::{assertions::request_id, operator::Setup};

on_both_stores!(every_refusal_carries_its_reason_and_a_replay_keeps_it);

/// Asserts the status's code, reason and domain; returns it.
#[track_caller]
fn assert_reason(
    result: Result<impl std::fmt::Debug, Status>,
    code: Code,
    reason: Reason,
    domain: &str,
) -> Status {
    let status = result.expect_err("a refusal");
    assert_eq!(status.code(), code, "{status:?}");
    let found = refusal(&status).unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(
        (found.reason, found.domain.as_str()),
        (reason, domain),
        "{status:?}"
    );
    status
}

fn line(sku: &str, quantity: i64, price: i64) -> OrderLine {
    OrderLine {
        sku: sku.into(),
        quantity,
        expected_unit_price_cents: price,
        expected_currency: "EUR".into(),
    }
}

fn reserve(order_id: &str, lines: Vec<OrderLine>) -> ReserveStockRequest {
    ReserveStockRequest {
        request_id: request_id(),
        order_id: order_id.into(),
        lines,
    }
}

fn address(country: &str) -> Address {
    Address {
        recipient: "Grace Hopper".into(),
        line1: "1 Navy Yard".into(),
        city: "Berlin".into(),
        postal_code: "10115".into(),
        country: country.into(),
    }
}

fn prepare(order_id: &str, country: &str) -> PrepareShipmentRequest {
    PrepareShipmentRequest {
        request_id: request_id(),
        order_id: order_id.into(),
        address: Some(address(country)),
        service_level: 0,
        item_count: 1,
    }
}

fn charge(order_id: &str, customer: &str, amount: i64, currency: &str) -> ChargeRequest {
    ChargeRequest {
        request_id: request_id(),
        order_id: order_id.into(),
        customer_id: customer.into(),
        amount_cents: amount,
        currency: currency.into(),
    }
}

fn keyed<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("x-api-key", key.parse().unwrap());
    }
    request
}

async fn every_refusal_carries_its_reason_and_a_replay_keeps_it(backend: Backend) {
    let setup = Setup::start(backend).await;
    let mut stock = setup.services.stock.stock().await;
    let mut shipping = setup.services.shipping.shipping().await;
    let mut payment = setup.services.payment.payment().await;
    let new_order = || Uuid::new_v4().to_string();

    // The shared ones: keys, a malformed field, a request_id reused.
    let get = GetProductRequest { sku: "BOOK".into() };
    assert_reason(
        stock.get_product(keyed(get.clone(), None)).await,
        Code::Unauthenticated,
        Reason::ApiKeyMissing,
        "ordersaga",
    );
    assert_reason(
        stock
            .get_product(keyed(get.clone(), Some("not-a-key")))
            .await,
        Code::Unauthenticated,
        Reason::ApiKeyInvalid,
        "ordersaga",
    );
    assert_reason(
        stock.get_product(admin(get.clone())).await,
        Code::PermissionDenied,
        Reason::BusinessKeyRequired,
        "ordersaga",
    );
    let restock = RestockRequest {
        request_id: request_id(),
        sku: "BOOK".into(),
        quantity: 1,
        ..Default::default()
    };
    assert_reason(
        stock.restock(authed(restock)).await,
        Code::PermissionDenied,
        Reason::AdminKeyRequired,
        "ordersaga",
    );
    let bad = stock
        .reserve_stock(authed(reserve(&new_order(), vec![line("BOOK", 0, 1500)])))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let violations = field_violations(&bad);
    assert_eq!(violations.len(), 1, "{bad:?}");
    assert_eq!(violations[0].0, "lines[0].quantity", "{bad:?}");
    let first = reserve(&new_order(), vec![line("BOOK", 1, 1500)]);
    stock.reserve_stock(authed(first.clone())).await.unwrap();
    let reused = ReserveStockRequest {
        lines: vec![line("BOOK", 2, 1500)],
        ..first
    };
    let status = assert_reason(
        stock.reserve_stock(authed(reused)).await,
        Code::InvalidArgument,
        Reason::RequestIdReused,
        "ordersaga",
    );
    assert_eq!(field_violations(&status)[0].0, "request_id");

    // Stock.
    assert_reason(
        stock
            .get_product(authed(GetProductRequest { sku: "NOPE".into() }))
            .await,
        Code::NotFound,
        Reason::UnknownSku,
        "stock.v1",
    );
    let incomplete = RestockRequest {
        request_id: request_id(),
        sku: "NEW-1".into(),
        quantity: 1,
        ..Default::default()
    };
    assert_reason(
        stock.restock(admin(incomplete)).await,
        Code::NotFound,
        Reason::NewSkuIncomplete,
        "stock.v1",
    );
    assert_reason(
        stock
            .reserve_stock(authed(reserve(&new_order(), vec![line("RARE", 2, 9900)])))
            .await,
        Code::FailedPrecondition,
        Reason::OutOfStock,
        "stock.v1",
    );
    assert_reason(
        stock
            .reserve_stock(authed(reserve(&new_order(), vec![line("BOOK", 1, 1)])))
            .await,
        Code::FailedPrecondition,
        Reason::PriceChanged,
        "stock.v1",
    );
    let dollars = RestockRequest {
        request_id: request_id(),
        sku: "USD-1".into(),
        quantity: 10,
        name: "A dollar thing".into(),
        unit_price_cents: 100,
        currency: "USD".into(),
    };
    stock.restock(admin(dollars)).await.unwrap();
    let mut usd = line("USD-1", 1, 100);
    usd.expected_currency = "USD".into();
    assert_reason(
        stock
            .reserve_stock(authed(reserve(
                &new_order(),
                vec![line("BOOK", 1, 1500), usd],
            )))
            .await,
        Code::FailedPrecondition,
        Reason::MixedCurrencies,
        "stock.v1",
    );
    let released = new_order();
    stock
        .release_stock(authed(ReleaseStockRequest {
            request_id: request_id(),
            order_id: released.clone(),
        }))
        .await
        .unwrap();
    assert_reason(
        stock
            .reserve_stock(authed(reserve(&released, vec![line("BOOK", 1, 1500)])))
            .await,
        Code::FailedPrecondition,
        Reason::AlreadyReleased,
        "stock.v1",
    );
    let reserved = new_order();
    stock
        .reserve_stock(authed(reserve(&reserved, vec![line("BOOK", 1, 1500)])))
        .await
        .unwrap();
    assert_reason(
        stock
            .reserve_stock(authed(reserve(&reserved, vec![line("BOOK", 1, 1500)])))
            .await,
        Code::FailedPrecondition,
        Reason::AlreadyReserved,
        "stock.v1",
    );

    // Shipping.
    assert_reason(
        shipping
            .prepare_shipment(authed(prepare(&new_order(), "AQ")))
            .await,
        Code::FailedPrecondition,
        Reason::CountryNotServed,
        "shipping.v1",
    );
    assert_reason(
        shipping
            .get_shipment(authed(GetShipmentRequest {
                order_id: new_order(),
            }))
            .await,
        Code::NotFound,
        Reason::NoShipment,
        "shipping.v1",
    );
    let cancelled = new_order();
    shipping
        .cancel_shipment(authed(CancelShipmentRequest {
            request_id: request_id(),
            order_id: cancelled.clone(),
        }))
        .await
        .unwrap();
    assert_reason(
        shipping
            .prepare_shipment(authed(prepare(&cancelled, "DE")))
            .await,
        Code::FailedPrecondition,
        Reason::AlreadyCancelled,
        "shipping.v1",
    );
    let prepared = new_order();
    shipping
        .prepare_shipment(authed(prepare(&prepared, "DE")))
        .await
        .unwrap();
    assert_reason(
        shipping
            .prepare_shipment(authed(prepare(&prepared, "DE")))
            .await,
        Code::FailedPrecondition,
        Reason::AlreadyPrepared,
        "shipping.v1",
    );

    // Payment, and a replay of a stored refusal: the same details again.
    assert_reason(
        payment
            .charge(authed(charge(&new_order(), "nobody", 100, "EUR")))
            .await,
        Code::NotFound,
        Reason::UnknownAccount,
        "payment.v1",
    );
    let broke = charge(&new_order(), "poor", 1_000_000, "EUR");
    let first = assert_reason(
        payment.charge(authed(broke.clone())).await,
        Code::FailedPrecondition,
        Reason::InsufficientFunds,
        "payment.v1",
    );
    let replayed = assert_reason(
        payment.charge(authed(broke)).await,
        Code::FailedPrecondition,
        Reason::InsufficientFunds,
        "payment.v1",
    );
    assert_eq!(
        replayed.message(),
        first.message(),
        "a replay answers as the first time"
    );
    assert_reason(
        payment
            .charge(authed(charge(&new_order(), "alice", 100, "USD")))
            .await,
        Code::FailedPrecondition,
        Reason::CurrencyMismatch,
        "payment.v1",
    );
    let refunded = new_order();
    payment
        .refund(authed(RefundRequest {
            request_id: request_id(),
            order_id: refunded.clone(),
        }))
        .await
        .unwrap();
    assert_reason(
        payment
            .charge(authed(charge(&refunded, "alice", 100, "EUR")))
            .await,
        Code::FailedPrecondition,
        Reason::AlreadyRefunded,
        "payment.v1",
    );
    let charged = new_order();
    payment
        .charge(authed(charge(&charged, "alice", 100, "EUR")))
        .await
        .unwrap();
    assert_reason(
        payment
            .charge(authed(charge(&charged, "alice", 100, "EUR")))
            .await,
        Code::FailedPrecondition,
        Reason::AlreadyCharged,
        "payment.v1",
    );
    assert_reason(
        payment
            .get_payment(authed(GetPaymentRequest {
                order_id: new_order(),
            }))
            .await,
        Code::NotFound,
        Reason::NoPayment,
        "payment.v1",
    );
    assert_reason(
        stock
            .get_reservation(authed(GetReservationRequest {
                order_id: new_order(),
            }))
            .await,
        Code::NotFound,
        Reason::NoReservation,
        "stock.v1",
    );

    // Orders.
    let mut orders: OrderServiceClient<_> = setup.client().await;
    assert_reason(
        orders
            .get_order(authed(GetOrderRequest {
                order_id: new_order(),
            }))
            .await,
        Code::NotFound,
        Reason::OrderNotFound,
        "orders.v1",
    );
    let unknown = orders
        .create_order(authed(order(&request_id(), "alice", &[("NOPE", 1)], "DE")))
        .await;
    let status = assert_reason(unknown, Code::NotFound, Reason::UnknownSku, "orders.v1");
    assert_eq!(field_violations(&status)[0].0, "items[0].sku", "{status:?}");
    let done = orders
        .create_order(authed(order(&request_id(), "alice", &[("BOOK", 1)], "DE")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let done = setup.until(&done.order_id, OrderStatus::Completed).await;
    let cancel = CancelOrderRequest {
        request_id: request_id(),
        order_id: done.order_id.clone(),
        reason: String::new(),
    };
    assert_reason(
        orders.cancel_order(authed(cancel)).await,
        Code::FailedPrecondition,
        Reason::NotCancellable,
        "orders.v1",
    );
    let retry = RetryCompensationRequest {
        request_id: request_id(),
        order_id: done.order_id.clone(),
    };
    assert_reason(
        orders.retry_compensation(admin(retry)).await,
        Code::FailedPrecondition,
        Reason::NotNeedingAttention,
        "orders.v1",
    );
    // A SKU not priced yet, with the stock service out of reach.
    setup.link.cut();
    let unpriced = orders
        .create_order(authed(order(&request_id(), "alice", &[("PEN", 1)], "DE")))
        .await;
    setup.link.restore();
    assert_reason(
        unpriced,
        Code::Unavailable,
        Reason::PricingUnavailable,
        "orders.v1",
    );
    let mixed = orders
        .create_order(authed(order(
            &request_id(),
            "alice",
            &[("BOOK", 1), ("USD-1", 1)],
            "DE",
        )))
        .await;
    assert_reason(
        mixed,
        Code::FailedPrecondition,
        Reason::MixedCurrencies,
        "orders.v1",
    );
    // An operator action's request_id, used again for another action.
    let stuck = setup.stuck_order().await;
    let action_id = request_id();
    let retry = RetryCompensationRequest {
        request_id: action_id.clone(),
        order_id: stuck.order_id.clone(),
    };
    orders.retry_compensation(admin(retry)).await.unwrap();
    let resolve = ResolveCompensationRequest {
        request_id: action_id,
        order_id: stuck.order_id.clone(),
        operator: "ops@example.com".into(),
        reason: "by hand".into(),
    };
    assert_reason(
        orders.resolve_compensation(admin(resolve)).await,
        Code::AlreadyExists,
        Reason::RequestIdReused,
        "orders.v1",
    );
}
