//! Every business RPC needs the right `x-api-key`; health and reflection are open.

use ordersaga_proto::{
    payment::v1::DepositRequest, shipping::v1::CancelShipmentRequest, stock::v1::RestockRequest,
};
use ordersaga_tests::{Backend, services};
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
