//! Fault injection: failures before the work, and replies dropped after it.

use ordersaga_proto::stock::v1::RestockRequest;
use ordersaga_tests::{Backend, admin, services};
use svc_kit::fault::FaultSettings;
use tonic::Code;

use crate::assertions::{assert_status, request_id};

on_both_stores!(
    failing_before_work_changes_nothing,
    dropped_reply_keeps_the_single_effect
);

fn restock(request_id: &str) -> RestockRequest {
    RestockRequest {
        request_id: request_id.into(),
        sku: "APPLE".into(),
        quantity: 7,
        name: "Apple".into(),
        unit_price_cents: 100,
        currency: "EUR".into(),
    }
}

async fn available(svc: &ordersaga_tests::Running) -> Option<i64> {
    let pool = svc.db.pool().await;
    sqlx::query_scalar("SELECT available FROM products WHERE sku = 'APPLE'")
        .fetch_optional(&pool)
        .await
        .unwrap()
}

async fn failing_before_work_changes_nothing(backend: Backend) {
    let faults = FaultSettings {
        fault_unavailable_rate: 1.0,
        ..Default::default()
    };
    let svc = services::stock_with_faults(backend, faults).await;
    let mut client = svc.stock().await;
    let result = client.restock(admin(restock(&request_id()))).await;
    assert_status(
        result,
        Code::Unavailable,
        &["injected fault", "before any work"],
    );
    assert_eq!(available(&svc).await, None);
}

async fn dropped_reply_keeps_the_single_effect(backend: Backend) {
    let faults = FaultSettings {
        fault_drop_reply_rate: 1.0,
        ..Default::default()
    };
    let svc = services::stock_with_faults(backend, faults).await;
    let mut client = svc.stock().await;
    let rid = request_id();
    for _ in 0..3 {
        // The caller sees a failure each time, though the work was done once.
        let result = client.restock(admin(restock(&rid))).await;
        assert_status(result, Code::Unavailable, &["reply dropped"]);
    }
    assert_eq!(
        available(&svc).await,
        Some(7),
        "the retried restock took effect exactly once"
    );
}
