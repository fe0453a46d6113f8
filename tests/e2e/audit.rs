//! `orderctl audit`: the saga log reconciled with each service's own
//! records through their read RPCs. A clean system passes; a mismatch
//! planted behind the saga's back is found, named, and fails the run.

use ordersaga_proto::{
    orders::v1::{OrderStatus, ResolveCompensationRequest},
    stock::v1::ReleaseStockRequest,
};
use ordersaga_tests::{Backend, admin, authed, system::order};

use crate::{
    assertions::request_id,
    operator::{Setup, orderctl, stdout},
};

on_both_stores!(orderctl_audit_passes_a_clean_system_and_finds_planted_mismatches);

async fn orderctl_audit_passes_a_clean_system_and_finds_planted_mismatches(backend: Backend) {
    let setup = Setup::start(backend).await;
    let place = |customer: &'static str| {
        let setup = &setup;
        async move {
            let placed = setup
                .client()
                .await
                .create_order(authed(order(&request_id(), customer, &[("BOOK", 2)], "DE")))
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            placed.order_id
        }
    };
    let completed = place("alice").await;
    let compensated = place("poor").await;
    setup.until(&completed, OrderStatus::Completed).await;
    setup.until(&compensated, OrderStatus::Compensated).await;
    // A stuck release resolved by hand: the stock service still holds the
    // book (a person released it elsewhere), which the audit cannot see.
    let by_hand = setup.stuck_order().await.order_id;
    setup
        .client()
        .await
        .resolve_compensation(admin(ResolveCompensationRequest {
            request_id: request_id(),
            order_id: by_hand.clone(),
            operator: "ops@example.com".into(),
            reason: "released the book in the warehouse system".into(),
        }))
        .await
        .unwrap();
    setup.until(&by_hand, OrderStatus::Compensated).await;

    let (stock, shipping, payment) = setup.services.endpoints();
    let audit = |extra: &'static [&'static str]| {
        let args: Vec<String> = [
            "audit",
            "--stock-addr",
            &stock,
            "--shipping-addr",
            &shipping,
            "--payment-addr",
            &payment,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
        let setup = &setup;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            orderctl(setup, None, &args).await
        }
    };

    let clean = audit(&[]).await;
    assert!(clean.status.success(), "{clean:?}");
    let printed = stdout(&clean);
    assert!(
        printed.contains(
            "audited 3 orders: 0 mismatches; 0 open (not checked); 1 effects resolved by hand"
        ),
        "{printed}"
    );

    // Behind the saga's back: someone releases the completed order's stock
    // on the stock service directly, and a charge for the compensated order
    // appears in the payment service's own database.
    setup
        .services
        .stock
        .stock()
        .await
        .release_stock(authed(ReleaseStockRequest {
            request_id: request_id(),
            order_id: completed.clone(),
        }))
        .await
        .unwrap();
    sqlx::any::install_default_drivers();
    let payments = sqlx::AnyPool::connect(&setup.services.payment.db.url)
        .await
        .unwrap();
    // (Its charge was refused for want of funds: the service holds no row.)
    sqlx::query(
        "INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
         VALUES ($1, 'planted', 'poor', 3000, 'EUR', 'charged', 0, 0)",
    )
    .bind(&compensated)
    .execute(&payments)
    .await
    .unwrap();
    payments.close().await;

    let found = audit(&[]).await;
    assert_eq!(found.status.code(), Some(1), "{found:?}");
    let printed = stdout(&found);
    assert!(
        printed.contains(&format!(
            "MISMATCH order {completed} (COMPLETED): stock: reservation RELEASED, expected reserved 2 BOOK"
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "MISMATCH order {compensated} (COMPENSATED): payment: charged 3000 EUR, expected nothing charged, or refunded"
        )),
        "{printed}"
    );
    assert!(
        printed.contains("audited 3 orders: 2 mismatches"),
        "{printed}"
    );
    assert!(
        String::from_utf8_lossy(&found.stderr)
            .contains("2 mismatches between the saga log and the services"),
        "{found:?}"
    );

    // For scripts: the same as JSON; a filter narrows what is audited.
    let json = audit(&["-o", "json", "--status", "completed"]).await;
    assert_eq!(json.status.code(), Some(1), "{json:?}");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["checked"], 1, "{report}");
    assert_eq!(
        report["mismatches"][0]["orderId"],
        completed.as_str(),
        "{report}"
    );
    assert_eq!(report["mismatches"][0]["service"], "stock", "{report}");
}
