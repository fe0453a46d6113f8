//! Only a definite answer is definite. A call whose stream is reset after the
//! callee committed (a real `RST_STREAM`, as a proxy or sidecar sends it) has an
//! unknown outcome: it is retried, and if it stays unknown the step itself is
//! compensated. Money is never taken without an order or a refund.

use std::time::Duration;

use h2::Reason;
use orchestrator::EngineArgs;
use ordersaga_proto::orders::v1::{OrderStatus, StepStatus};
use ordersaga_tests::{
    API_KEY, Backend,
    h2_proxy::{H2Proxy, Rule},
    services,
    system::{DomainServices, Options, order},
};

use crate::assertions::{has_forward_step, request_id, terminal_order};

on_both_stores!(a_charge_whose_stream_is_reset_after_it_committed_is_refunded);

const WAIT: Duration = Duration::from_secs(60);

async fn a_charge_whose_stream_is_reset_after_it_committed_is_refunded(backend: Backend) {
    let mut services = DomainServices::start(backend, &Options::default()).await;
    // Every Charge (a batch of one) commits, then its stream is reset with INTERNAL_ERROR, which
    // tonic reports as INTERNAL: not a "no", an unknown.
    let proxy = H2Proxy::start(
        services.payment.addr,
        Rule::ResetAfterReply {
            path_suffix: "/ChargeBatch".into(),
            reason: Reason::INTERNAL_ERROR,
        },
    )
    .await;
    services.payment_endpoint = Some(proxy.endpoint());
    let downstream = services.downstream();
    let orchestrator = services::orchestrator(backend, move |url| {
        let mut settings = orchestrator::Settings::local(url, API_KEY, downstream);
        settings.engine = EngineArgs {
            step_max_attempts: 3,
            retry_initial_backoff_ms: 5,
            retry_max_backoff_ms: 20,
            compensation_max_backoff_ms: 20,
            ..Default::default()
        };
        settings
    })
    .await;
    let client = ordersaga_proto::client::OrderClient::connect(orchestrator.endpoint(), API_KEY)
        .await
        .unwrap();
    let created = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 2)], "DE"))
        .await
        .unwrap();
    let order = terminal_order(&client, &created.order_id, WAIT).await;
    assert_eq!(
        OrderStatus::try_from(order.status).unwrap(),
        OrderStatus::Compensated,
        "{order:?}"
    );
    assert!(
        has_forward_step(&order, "charge_payment", StepStatus::Unknown),
        "the charge's outcome is unknown, not failed: {order:?}"
    );
    assert_eq!(proxy.resets(), 3, "each attempt was retried");
    let effects = services.effects().await;
    assert_eq!(effects.charged, 0, "the charge was refunded: {effects:?}");
    assert_eq!(effects.refunded, 1, "{effects:?}");
    assert_eq!(effects.shipments_cancelled, 1, "{effects:?}");
    assert_eq!(effects.released_with_stock, 1, "{effects:?}");
    effects.assert_conserved();
}
