//! Crash recovery: the orchestrator is a real process, killed with SIGKILL
//! (`kill -9`) while sagas are in flight, at several points, and restarted on
//! the same store. Every saga must finish as its inputs dictate, with no effect
//! doubled.

use std::time::Duration;

use ordersaga_proto::orders::v1::OrderStatus;
use ordersaga_tests::{
    Backend, TestDb, eventually,
    process::orchestrator_process,
    system::{DomainServices, Options, order},
};
use svc_kit::fault::FaultSettings;

use crate::{assertions::request_id, bins};

on_both_stores!(kill_9_mid_saga_then_every_saga_finishes_once);

async fn open_sagas(db: &TestDb) -> i64 {
    let pool = db.pool().await;
    sqlx::query_scalar("SELECT COUNT(*) FROM sagas WHERE status IN ('RUNNING', 'COMPENSATING')")
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn kill_9_mid_saga_then_every_saga_finishes_once(backend: Backend) {
    // Slow services keep sagas in flight; dropped replies add unknown outcomes.
    let faults = FaultSettings {
        fault_latency_ms: 400,
        fault_drop_reply_rate: 0.1,
        ..Default::default()
    };
    let services = DomainServices::start(backend, &Options::faults_everywhere(faults)).await;
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut process = orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &[]);
    process.start().await;
    let client = process.order_client().await;

    let orders: Vec<(String, &str, &str)> = (0..40)
        .map(|i| {
            let customer = if i % 5 == 0 { "poor" } else { "alice" };
            let country = if i % 13 == 1 { "AQ" } else { "DE" };
            (request_id(), customer, country)
        })
        .collect();
    let creates = orders.iter().map(|(rid, customer, country)| {
        let client = client.clone();
        let request = order(rid, customer, &[("BOOK", 1)], country);
        async move { client.create_order(request).await.expect("create").order_id }
    });
    let ids: Vec<String> = futures::future::join_all(creates).await;

    // Kill at several points of the sagas' lives: early (first steps in
    // flight), later (last steps and compensations), and right after a recovery.
    for delay_ms in [300, 900, 150] {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        process.kill().await;
        let open = open_sagas(&db).await;
        assert!(
            open > 0,
            "the kill after {delay_ms} ms should find sagas in flight"
        );
        process.start().await;
        process.order_client().await;
    }

    let client = process.order_client().await;
    let finished = eventually("every saga to finish", Duration::from_secs(120), || {
        let client = client.clone();
        let ids = ids.clone();
        async move {
            let mut finished = Vec::new();
            for id in &ids {
                let order = client.get_order(id).await.ok()?;
                let status = OrderStatus::try_from(order.status).ok()?;
                if matches!(status, OrderStatus::Running | OrderStatus::Compensating) {
                    return None;
                }
                finished.push(order);
            }
            Some(finished)
        }
    })
    .await;

    let mut completed = 0;
    for (order, (_, customer, country)) in finished.iter().zip(&orders) {
        let expected = if *country == "AQ" || *customer == "poor" {
            OrderStatus::Compensated
        } else {
            OrderStatus::Completed
        };
        assert_eq!(
            OrderStatus::try_from(order.status).unwrap(),
            expected,
            "{order:?}"
        );
        if expected == OrderStatus::Completed {
            completed += 1;
        }
    }
    let effects = services.effects().await;
    assert_eq!(effects.reserved, completed, "{effects:?}");
    assert_eq!(effects.shipments_prepared, completed, "{effects:?}");
    assert_eq!(effects.charged, completed, "{effects:?}");
    assert_eq!(effects.refunded, 0, "{effects:?}");
    assert_eq!(effects.products["BOOK"].1, completed, "{effects:?}");
    effects.assert_conserved();
    process.kill().await;
}
