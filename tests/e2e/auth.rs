//! Every business RPC needs a business `x-api-key`, every admin RPC an admin
//! key; each scope takes a set of keys; health and reflection are open.

use ordersaga_proto::{
    payment::v1::DepositRequest, shipping::v1::CancelShipmentRequest, stock::v1::RestockRequest,
};
use ordersaga_tests::{ADMIN_KEY, API_KEY, Backend, services};
use tonic::{Code, Request};

use crate::assertions::{assert_status, order_id, request_id};

on_both_stores!(missing_or_wrong_key_is_unauthenticated_and_does_nothing);

fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("x-api-key", key.parse().unwrap());
    }
    request
}

async fn missing_or_wrong_key_is_unauthenticated_and_does_nothing(backend: Backend) {
    let stock = services::stock(backend).await;
    let shipping = services::shipping(backend).await;
    let payment = services::payment(backend).await;
    let (mut stock_client, mut shipping_client, mut payment_client) = (
        stock.stock().await,
        shipping.shipping().await,
        payment.payment().await,
    );

    for key in [None, Some("wrong-key"), Some("")] {
        let restock = RestockRequest {
            request_id: request_id(),
            sku: "APPLE".into(),
            quantity: 1,
            name: "Apple".into(),
            unit_price_cents: 100,
            currency: "EUR".into(),
        };
        assert_status(
            stock_client.restock(with_key(restock, key)).await,
            Code::Unauthenticated,
            &["x-api-key"],
        );
        let cancel = CancelShipmentRequest {
            request_id: request_id(),
            order_id: order_id(),
        };
        assert_status(
            shipping_client.cancel_shipment(with_key(cancel, key)).await,
            Code::Unauthenticated,
            &["x-api-key"],
        );
        let deposit = DepositRequest {
            request_id: request_id(),
            customer_id: "alice".into(),
            amount_cents: 100,
            currency: "EUR".into(),
        };
        assert_status(
            payment_client.deposit(with_key(deposit, key)).await,
            Code::Unauthenticated,
            &["x-api-key"],
        );
    }

    for (svc, table) in [
        (&stock, "products"),
        (&shipping, "shipments"),
        (&payment, "accounts"),
    ] {
        let pool = svc.db.pool().await;
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(rows, 0, "{table}: nothing may be written without the key");
        let claims: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idempotency")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(claims, 0);
    }
}

on_both_stores!(each_scope_takes_only_its_own_keys_and_the_refused_write_nothing);

/// A business key can't restock or deposit, an admin key can't reserve,
/// charge or cancel, and a refused call writes nothing.
async fn each_scope_takes_only_its_own_keys_and_the_refused_write_nothing(backend: Backend) {
    let stock = services::stock(backend).await;
    let payment = services::payment(backend).await;
    let shipping = services::shipping(backend).await;
    let (mut stock_client, mut payment_client, mut shipping_client) = (
        stock.stock().await,
        payment.payment().await,
        shipping.shipping().await,
    );
    let restock = RestockRequest {
        request_id: request_id(),
        sku: "APPLE".into(),
        quantity: 1,
        name: "Apple".into(),
        unit_price_cents: 100,
        currency: "EUR".into(),
    };
    assert_status(
        stock_client
            .restock(with_key(restock.clone(), Some(API_KEY)))
            .await,
        Code::PermissionDenied,
        &["admin key", "ADMIN_API_KEY"],
    );
    let deposit = DepositRequest {
        request_id: request_id(),
        customer_id: "alice".into(),
        amount_cents: 100,
        currency: "EUR".into(),
    };
    assert_status(
        payment_client
            .deposit(with_key(deposit, Some(API_KEY)))
            .await,
        Code::PermissionDenied,
        &["ADMIN_API_KEY"],
    );
    let cancel = CancelShipmentRequest {
        request_id: request_id(),
        order_id: order_id(),
    };
    assert_status(
        shipping_client
            .cancel_shipment(with_key(cancel, Some(ADMIN_KEY)))
            .await,
        Code::PermissionDenied,
        &["business key", "APPLICATION_API_KEY"],
    );
    for (svc, table) in [
        (&stock, "products"),
        (&shipping, "shipments"),
        (&payment, "accounts"),
    ] {
        let pool = svc.db.pool().await;
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(rows, 0, "{table}: a call of the wrong scope wrote");
    }
    // The admin key does what the business key could not.
    stock_client
        .restock(with_key(restock, Some(ADMIN_KEY)))
        .await
        .expect("the admin key restocks");
}

on_both_stores!(a_rotated_key_set_takes_the_new_and_the_old_key_and_no_other);

/// Rotation without downtime: while both keys are listed, clients with
/// either are served; after the old one is dropped, it is refused.
async fn a_rotated_key_set_takes_the_new_and_the_old_key_and_no_other(backend: Backend) {
    const NEW: &str = "new-business-key-0123456789abcdef0";
    const OLD: &str = "old-business-key-0123456789abcdef0";
    let query = |sku: &str| ordersaga_proto::stock::v1::GetProductRequest { sku: sku.into() };
    let during = services::stock_with_keys(backend, &format!("{NEW},{OLD}"), None).await;
    let mut client = during.stock().await;
    for key in [NEW, OLD] {
        // No such product: past the key check, the service itself answers.
        assert_status(
            client
                .get_product(with_key(query("APPLE"), Some(key)))
                .await,
            Code::NotFound,
            &["APPLE"],
        );
    }
    assert_status(
        client
            .get_product(with_key(query("APPLE"), Some(API_KEY)))
            .await,
        Code::Unauthenticated,
        &["x-api-key"],
    );
    // Without an admin key set, admin RPCs are off.
    let restock = RestockRequest {
        request_id: request_id(),
        sku: "APPLE".into(),
        quantity: 1,
        name: "Apple".into(),
        unit_price_cents: 100,
        currency: "EUR".into(),
    };
    let off = client.restock(with_key(restock, Some(NEW))).await;
    assert_eq!(
        off.as_ref()
            .err()
            .and_then(ordersaga_proto::errors::refusal)
            .map(|r| r.reason),
        Some(ordersaga_proto::errors::Reason::AdminRpcsOff),
        "{off:?}"
    );
    assert_status(
        off,
        Code::PermissionDenied,
        &["admin RPCs are off", "ADMIN_API_KEY"],
    );
    during.stop().await;

    let after = services::stock_with_keys(backend, NEW, None).await;
    let mut client = after.stock().await;
    assert_status(
        client
            .get_product(with_key(query("APPLE"), Some(OLD)))
            .await,
        Code::Unauthenticated,
        &["x-api-key"],
    );
    assert_status(
        client
            .get_product(with_key(query("APPLE"), Some(NEW)))
            .await,
        Code::NotFound,
        &["APPLE"],
    );
}
