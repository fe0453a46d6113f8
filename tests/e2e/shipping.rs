//! The shipping service: idempotent shipments, cancellations that overtake
//! them, served countries, and validation.

use ordersaga_proto::shipping::v1::{
    Address, CancelShipmentRequest, GetShipmentRequest, PrepareShipmentRequest, ServiceLevel,
    ShipmentStatus,
};
use ordersaga_tests::{Backend, authed, services};
use tonic::Code;

use crate::assertions::{assert_status, order_id, race_alone, request_id, stored_refusal};

on_both_stores!(
    repeated_prepare_returns_the_same_shipment_once,
    reused_request_id_with_another_payload_is_refused,
    cancel_before_prepare_refuses_the_late_prepare,
    cancel_is_idempotent_and_safe_to_repeat,
    unserved_country_is_a_definite_refusal,
    each_invalid_field_is_named_and_nothing_is_written,
);

fn address(country: &str) -> Address {
    Address {
        recipient: "Ada Lovelace".into(),
        line1: "12 St James's Square".into(),
        city: "London".into(),
        postal_code: "SW1Y 4JH".into(),
        country: country.into(),
    }
}

fn prepare(request_id: &str, order_id: &str, country: &str) -> PrepareShipmentRequest {
    PrepareShipmentRequest {
        request_id: request_id.into(),
        order_id: order_id.into(),
        address: Some(address(country)),
        service_level: ServiceLevel::Express as i32,
        item_count: 3,
    }
}

async fn shipment_rows(svc: &ordersaga_tests::Running) -> i64 {
    let pool = svc.db.pool().await;
    sqlx::query_scalar("SELECT COUNT(*) FROM shipments WHERE status = 'prepared'")
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn repeated_prepare_returns_the_same_shipment_once(backend: Backend) {
    let svc = services::shipping(backend).await;
    let mut client = svc.shipping().await;
    let order = order_id();
    let request = prepare(&request_id(), &order, "GB");
    let first = client
        .prepare_shipment(authed(request.clone()))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .prepare_shipment(authed(request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second);
    let shipment = first.shipment.unwrap();
    assert!(
        shipment.tracking_id.starts_with("TRK-"),
        "{}",
        shipment.tracking_id
    );
    assert_eq!(shipment.status, ShipmentStatus::Prepared as i32);
    assert_eq!(shipment.service_level, ServiceLevel::Express as i32);
    assert_eq!(shipment_rows(&svc).await, 1);

    let fetched = client
        .get_shipment(authed(GetShipmentRequest { order_id: order }))
        .await
        .unwrap()
        .into_inner()
        .shipment
        .unwrap();
    assert_eq!(fetched, shipment);
}

async fn reused_request_id_with_another_payload_is_refused(backend: Backend) {
    let svc = services::shipping(backend).await;
    let mut client = svc.shipping().await;
    let rid = request_id();
    let order = order_id();
    client
        .prepare_shipment(authed(prepare(&rid, &order, "GB")))
        .await
        .unwrap();
    let changed = client
        .prepare_shipment(authed(prepare(&rid, &order, "DE")))
        .await;
    assert_status(changed, Code::InvalidArgument, &["request_id", "different"]);
    assert_eq!(shipment_rows(&svc).await, 1);
}

async fn cancel_before_prepare_refuses_the_late_prepare(backend: Backend) {
    let svc = services::shipping(backend).await;
    let mut client = svc.shipping().await;
    let order = order_id();
    let cancelled = client
        .cancel_shipment(authed(CancelShipmentRequest {
            request_id: request_id(),
            order_id: order.clone(),
        }))
        .await
        .expect("cancelling nothing succeeds")
        .into_inner();
    assert!(!cancelled.cancelled_shipment);
    let late = client
        .prepare_shipment(authed(prepare(&request_id(), &order, "GB")))
        .await;
    assert_status(
        late,
        Code::FailedPrecondition,
        &["cancelled before it was prepared"],
    );
    assert_eq!(shipment_rows(&svc).await, 0);
}

async fn cancel_is_idempotent_and_safe_to_repeat(backend: Backend) {
    let svc = services::shipping(backend).await;
    let mut client = svc.shipping().await;
    let order = order_id();
    client
        .prepare_shipment(authed(prepare(&request_id(), &order, "GB")))
        .await
        .unwrap();
    let cancel = CancelShipmentRequest {
        request_id: request_id(),
        order_id: order.clone(),
    };
    let first = client
        .cancel_shipment(authed(cancel.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(first.cancelled_shipment);
    assert_eq!(
        client
            .cancel_shipment(authed(cancel))
            .await
            .unwrap()
            .into_inner(),
        first
    );
    let again = client
        .cancel_shipment(authed(CancelShipmentRequest {
            request_id: request_id(),
            order_id: order.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.cancelled_shipment);
    let shipment = client
        .get_shipment(authed(GetShipmentRequest { order_id: order }))
        .await
        .unwrap()
        .into_inner()
        .shipment
        .unwrap();
    assert_eq!(shipment.status, ShipmentStatus::Cancelled as i32);
}

async fn unserved_country_is_a_definite_refusal(backend: Backend) {
    let svc = services::shipping(backend).await;
    let mut client = svc.shipping().await;
    let request = prepare(&request_id(), &order_id(), "AQ");
    assert_status(
        client.prepare_shipment(authed(request.clone())).await,
        Code::FailedPrecondition,
        &["AQ"],
    );
    // Replayed as the same answer.
    assert_status(
        client.prepare_shipment(authed(request)).await,
        Code::FailedPrecondition,
        &["AQ"],
    );
    assert_eq!(shipment_rows(&svc).await, 0);
    let missing = client
        .get_shipment(authed(GetShipmentRequest {
            order_id: order_id(),
        }))
        .await;
    assert_status(missing, Code::NotFound, &["no shipment"]);
}

async fn each_invalid_field_is_named_and_nothing_is_written(backend: Backend) {
    let svc = services::shipping(backend).await;
    let mut client = svc.shipping().await;
    let rid = request_id();
    let good = prepare(&rid, &order_id(), "GB");
    let with_address = |f: &dyn Fn(&mut Address)| {
        let mut request = good.clone();
        f(request.address.as_mut().unwrap());
        request
    };
    let cases: Vec<(&str, PrepareShipmentRequest)> = vec![
        (
            "request_id",
            PrepareShipmentRequest {
                request_id: String::new(),
                ..good.clone()
            },
        ),
        (
            "order_id",
            PrepareShipmentRequest {
                order_id: "123".into(),
                ..good.clone()
            },
        ),
        (
            "address",
            PrepareShipmentRequest {
                address: None,
                ..good.clone()
            },
        ),
        (
            "address.recipient",
            with_address(&|a| a.recipient = " ".into()),
        ),
        (
            "address.line1",
            with_address(&|a| a.line1 = "x".repeat(201)),
        ),
        ("address.city", with_address(&|a| a.city = String::new())),
        (
            "address.postal_code",
            with_address(&|a| a.postal_code = String::new()),
        ),
        (
            "address.country",
            with_address(&|a| a.country = "gb".into()),
        ),
        (
            "address.country",
            with_address(&|a| a.country = "GBR".into()),
        ),
        (
            "service_level",
            PrepareShipmentRequest {
                service_level: 7,
                ..good.clone()
            },
        ),
        (
            "item_count",
            PrepareShipmentRequest {
                item_count: 0,
                ..good.clone()
            },
        ),
    ];
    for (field, request) in cases {
        assert_status(
            client.prepare_shipment(authed(request)).await,
            Code::InvalidArgument,
            &[field],
        );
    }
    let bad_cancel = client
        .cancel_shipment(authed(CancelShipmentRequest {
            request_id: request_id(),
            order_id: "nope".into(),
        }))
        .await;
    assert_status(bad_cancel, Code::InvalidArgument, &["order_id"]);
    assert_eq!(shipment_rows(&svc).await, 0);
    client
        .prepare_shipment(authed(good))
        .await
        .expect("the corrected request goes through");
}

/// PostgreSQL: a request alone in the service commits with its one
/// statement, outside the shared transaction, so nothing can roll back a
/// part of it. The same request's claim written and committed by another
/// connection (the request sent twice, to two shipping processes; the
/// other refused it) while this statement inserted the shipment must fail
/// the statement whole: no shipment, and the request hears the answer that
/// won. (Seen failing while the claim's insert did nothing on a conflict:
/// the shipment stayed, prepared, with no request's reply to tell of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_prepare_whose_claim_is_raced_writes_no_shipment() {
    let svc = services::shipping(Backend::Postgres).await;
    let client = svc.shipping().await;
    let pool = svc.db.pool().await;
    let id = request_id();
    let request = prepare(&id, &order_id(), "DE");
    let theirs = stored_refusal("PrepareShipment", &request, "refused by the other process");
    let mut sending = client.clone();
    let raced = race_alone(&pool, &theirs, &id, async move {
        sending.prepare_shipment(authed(request)).await
    })
    .await;
    assert_eq!(shipment_rows(&svc).await, 0, "a shipment was written");
    assert_status(
        raced,
        Code::FailedPrecondition,
        &["refused by the other process"],
    );
}

/// PostgreSQL: a lone cancel whose order's shipment another connection
/// prepares and commits while the cancel waits to write the order's
/// tombstone. The cancel must see that shipment and cancel it: answered
/// "nothing to cancel", the shipment would go out. (A cancel is one
/// statement, whose snapshot predates the other's commit: it writes
/// nothing then, and runs again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_cancel_raced_by_a_shipment_of_another_connection_cancels_it() {
    let svc = services::shipping(Backend::Postgres).await;
    let mut client = svc.shipping().await;
    let pool = svc.db.pool().await;
    let order = order_id();
    let cancel = CancelShipmentRequest {
        request_id: request_id(),
        order_id: order.clone(),
    };
    let mut sending = client.clone();
    let raced = race_alone(
        &pool,
        "INSERT INTO shipments (order_id, shipment_id, tracking_id, status, recipient, line1, city, postal_code, \
           country, service_level, item_count, created_at_ms, updated_at_ms) \
         VALUES ($1, 'theirs', 'T', 'prepared', 'Ada', 'Street 1', 'London', 'SW1', 'GB', 1, 1, 0, 0)",
        &order,
        {
            let cancel = cancel.clone();
            async move { sending.cancel_shipment(authed(cancel)).await }
        },
    )
    .await;
    assert!(
        raced.unwrap().into_inner().cancelled_shipment,
        "the shipment that won was not cancelled"
    );
    let shipment = client
        .get_shipment(authed(GetShipmentRequest {
            order_id: order.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .shipment
        .unwrap();
    assert_eq!(shipment.status, ShipmentStatus::Cancelled as i32);
    let again = client.cancel_shipment(authed(cancel)).await.unwrap();
    assert!(again.into_inner().cancelled_shipment, "a replay differs");
}
