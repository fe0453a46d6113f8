//! Cancellation under failure: an accepted cancel ends CANCELLED whatever
//! happens next (the step in flight fails, the orchestrator is killed, or it
//! is stopped while it waits to retry), and every effect is undone.

use std::time::Duration;

use h2::Reason;
use ordersaga_proto::orders::v1::{OrderStatus, StepStatus};
use ordersaga_tests::{
    Backend, TestDb,
    h2_proxy::{H2Proxy, Rule},
    process::orchestrator_process,
    system::{DomainServices, Options, System, order},
};
use svc_kit::fault::FaultSettings;

use crate::{
    assertions::{has_forward_step, request_id, terminal_order},
    bins,
};

on_both_stores!(
    a_cancel_then_a_kill_9_compensates_the_step_in_flight,
    a_cancel_then_sigterm_in_a_retry_backoff_compensates_the_step_in_flight,
    an_accepted_cancel_ends_cancelled_even_when_the_step_in_flight_fails,
);

const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
enum Stop {
    Kill9,
    Sigterm,
}

async fn a_cancel_then_a_kill_9_compensates_the_step_in_flight(backend: Backend) {
    cancel_then_stop(backend, Stop::Kill9).await
}

async fn a_cancel_then_sigterm_in_a_retry_backoff_compensates_the_step_in_flight(backend: Backend) {
    cancel_then_stop(backend, Stop::Sigterm).await
}

/// Shipping does the work and loses every reply (each a batch of one), so
/// PrepareShipment retries;
/// the order is cancelled meanwhile, the orchestrator is stopped, shipping
/// heals, and the orchestrator restarts. The shipment that was prepared while
/// its reply was lost must be cancelled, not left PREPARED forever.
async fn cancel_then_stop(backend: Backend, stop: Stop) {
    let mut services = DomainServices::start(backend, &Options::default()).await;
    let proxy = H2Proxy::start(
        services.shipping.addr,
        Rule::ResetAfterReply {
            path_suffix: "/PrepareShipmentBatch".into(),
            reason: Reason::CANCEL,
        },
    )
    .await;
    services.shipping_endpoint = Some(proxy.endpoint());
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    // Slow retries: the saga spends its time in a backoff, where SIGTERM finds it.
    let mut orchestrator = orchestrator_process(
        bins::ORCHESTRATOR,
        dir.path(),
        &db.url,
        &services,
        &[
            ("RETRY_INITIAL_BACKOFF_MS", "300".into()),
            ("RETRY_MAX_BACKOFF_MS", "600".into()),
            ("STEP_MAX_ATTEMPTS", "100".into()),
        ],
    );
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let created = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 2)], "DE"))
        .await
        .unwrap();
    ordersaga_tests::eventually("a prepared shipment whose reply was lost", WAIT, || async {
        (proxy.resets() >= 1).then_some(())
    })
    .await;
    client
        .cancel_order(&created.order_id, request_id(), "changed my mind")
        .await
        .expect("the cancel is accepted before the charge");
    match stop {
        Stop::Kill9 => orchestrator.kill().await,
        Stop::Sigterm => orchestrator.terminate().await,
    }
    proxy.set_rule(Rule::Pass);
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let order = terminal_order(&client, &created.order_id, WAIT).await;
    assert_eq!(
        OrderStatus::try_from(order.status).unwrap(),
        OrderStatus::Cancelled,
        "{order:?}"
    );
    let effects = services.effects().await;
    assert_eq!(effects.reserved, 0, "{effects:?}");
    assert_eq!(effects.released_with_stock, 1, "{effects:?}");
    assert_eq!(
        effects.shipments_prepared, 0,
        "the shipment prepared while its reply was lost stays PREPARED: {effects:?}"
    );
    assert_eq!(effects.shipments_cancelled, 1, "{effects:?}");
    assert_eq!(effects.charged, 0, "{effects:?}");
    assert_eq!(effects.products["BOOK"], (10_000, 0));
    effects.assert_conserved();
    orchestrator.kill().await;
}

/// A cancel accepted while a step is in flight wins over that step's failure:
/// the order ends CANCELLED, as it would if a crash had come in between, and
/// never FAILED or COMPENSATED. Two orders: the first step fails (out of
/// stock), or the second (an unshippable country).
async fn an_accepted_cancel_ends_cancelled_even_when_the_step_in_flight_fails(backend: Backend) {
    let slow = FaultSettings {
        fault_latency_ms: 1_500,
        ..Default::default()
    };
    let options = Options {
        stock_faults: slow.clone(),
        shipping_faults: slow,
        ..Default::default()
    };
    let system = System::start(backend, options).await;
    let client = system.client().await;
    let cases = [
        // RARE has one unit: reserving five fails for good.
        (
            order(&request_id(), "alice", &[("RARE", 5)], "DE"),
            "reserve_stock",
        ),
        // Nobody ships to AQ.
        (
            order(&request_id(), "alice", &[("BOOK", 1)], "AQ"),
            "prepare_shipment",
        ),
    ];
    for (request, failing_step) in cases {
        let created = client.create_order(request).await.unwrap();
        ordersaga_tests::eventually("the failing step in flight", WAIT, || async {
            let order = client.get_order(&created.order_id).await.ok()?;
            has_forward_step(&order, failing_step, StepStatus::Running).then_some(())
        })
        .await;
        client
            .cancel_order(&created.order_id, request_id(), "changed my mind")
            .await
            .expect("the cancel is accepted");
        let order = terminal_order(&client, &created.order_id, WAIT).await;
        assert_eq!(
            OrderStatus::try_from(order.status).unwrap(),
            OrderStatus::Cancelled,
            "an accepted cancel ends CANCELLED although {failing_step} failed: {order:?}"
        );
        assert!(
            has_forward_step(&order, failing_step, StepStatus::Failed),
            "the step's failure stays visible: {order:?}"
        );
    }
    let effects = system.services.effects().await;
    assert_eq!(
        (
            effects.reserved,
            effects.shipments_prepared,
            effects.charged
        ),
        (0, 0, 0)
    );
    effects.assert_conserved();
}
