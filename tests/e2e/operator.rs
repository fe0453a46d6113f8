//! Operator actions on an order that rests NEEDS_ATTENTION (a compensation
//! that kept failing past its budget): run it again once the cause is fixed,
//! or record that a person undid its effect by hand. Admin key only,
//! idempotent by their own request_id, refused in any other status.

use std::time::Duration;

use ordersaga_proto::{
    client::OrderClient,
    orders::v1::{
        Order, OrderStatus, RetryCompensationRequest, StepPhase, StepStatus,
        order_service_client::OrderServiceClient,
    },
    stock::v1::GetProductRequest,
};
use ordersaga_tests::{
    ADMIN_KEY, Backend, TestDb, admin, authed,
    broker::TcpProxy,
    eventually,
    process::{ServiceProcess, orchestrator_process},
    system::{DomainServices, Options, order},
};
use svc_kit::fault::FaultSettings;
use tonic::{Code, transport::Channel};

use crate::{assertions::request_id, bins};

on_both_stores!(
    a_stuck_compensation_is_retried_or_resolved_by_an_operator,
    orderctl_bulk_retries_and_cancels_every_matching_order_once,
);

const WAIT: Duration = Duration::from_secs(60);

/// The system, with an orchestrator process whose link to stock can be cut
/// and whose compensations give up after a second (also used by the
/// explorer's tests).
pub(crate) struct Setup {
    pub(crate) services: DomainServices,
    /// Between the orchestrator and stock: cut, stock's releases fail.
    pub(crate) link: TcpProxy,
    pub(crate) orchestrator: ServiceProcess,
    db: TestDb,
    _dir: tempfile::TempDir,
}

impl Setup {
    pub(crate) async fn start(backend: Backend) -> Setup {
        Setup::start_with(backend, 1_000, &[]).await
    }

    /// Every shipping call takes `shipping_latency_ms`; `env` goes to the
    /// orchestrator on top.
    pub(crate) async fn start_with(
        backend: Backend,
        shipping_latency_ms: u64,
        env: &[(&str, String)],
    ) -> Setup {
        // Shipping is slow, so the link to stock can be cut in between.
        let options = Options {
            shipping_faults: FaultSettings {
                fault_latency_ms: shipping_latency_ms,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut services = DomainServices::start(backend, &options).await;
        let link = TcpProxy::start(services.stock.addr).await;
        services.stock_endpoint = Some(format!("http://{}", link.addr));
        let db = TestDb::new(backend).await;
        let dir = tempfile::tempdir().unwrap();
        let mut orchestrator = orchestrator_process(
            bins::ORCHESTRATOR,
            dir.path(),
            &db.url,
            &services,
            &[
                &[
                    ("COMPENSATION_ATTENTION_AFTER_SECS", "1".to_owned()),
                    ("COMPENSATION_MAX_BACKOFF_MS", "50".to_owned()),
                ],
                env,
            ]
            .concat(),
        );
        orchestrator.start().await;
        Setup {
            services,
            link,
            orchestrator,
            db,
            _dir: dir,
        }
    }

    pub(crate) async fn client(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::connect(self.orchestrator.endpoint())
            .await
            .unwrap()
    }

    pub(crate) async fn get(&self, order_id: &str) -> Order {
        self.client()
            .await
            .get_order(authed(ordersaga_proto::orders::v1::GetOrderRequest {
                order_id: order_id.to_owned(),
            }))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    }

    pub(crate) async fn until(&self, order_id: &str, status: OrderStatus) -> Order {
        eventually(status.as_str_name(), WAIT, || async {
            let order = self.get(order_id).await;
            (order.status == status as i32).then_some(order)
        })
        .await
    }

    /// The types of the events the orchestrator's outbox holds for an
    /// order, in their order.
    async fn events(&self, order_id: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT event_type FROM outbox WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(order_id)
        .fetch_all(&self.db.pool().await)
        .await
        .unwrap()
    }

    async fn available_books(&self) -> i64 {
        self.services
            .stock
            .stock()
            .await
            .get_product(authed(GetProductRequest { sku: "BOOK".into() }))
            .await
            .unwrap()
            .into_inner()
            .product
            .unwrap()
            .available
    }

    /// An order (unshippable, so it compensates) whose release of the stock
    /// keeps failing past its budget: it rests NEEDS_ATTENTION.
    pub(crate) async fn stuck_order(&self) -> Order {
        self.stuck_orders(1).await.remove(0)
    }

    /// `n` such orders at once.
    pub(crate) async fn stuck_orders(&self, n: usize) -> Vec<Order> {
        let mut placed = Vec::new();
        for _ in 0..n {
            let order = self
                .client()
                .await
                .create_order(authed(order(&request_id(), "alice", &[("BOOK", 1)], "AQ")))
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            placed.push(order.order_id);
        }
        for order_id in &placed {
            eventually("the reservation", WAIT, || async {
                let order = self.get(order_id).await;
                order
                    .steps
                    .iter()
                    .any(|s| s.name == "reserve_stock" && s.status == StepStatus::Succeeded as i32)
                    .then_some(())
            })
            .await;
        }
        self.link.cut();
        let mut resting = Vec::new();
        for order_id in &placed {
            resting.push(self.until(order_id, OrderStatus::NeedsAttention).await);
        }
        self.link.restore();
        resting
    }
}

fn release(order: &Order) -> &ordersaga_proto::orders::v1::Step {
    order
        .steps
        .iter()
        .find(|s| s.name == "reserve_stock" && s.phase == StepPhase::Compensation as i32)
        .expect("the release step")
}

async fn a_stuck_compensation_is_retried_or_resolved_by_an_operator(backend: Backend) {
    let setup = Setup::start(backend).await;
    let mut client = setup.client().await;
    let books = setup.available_books().await;

    // Retry now: the same release, once the link is back.
    let stuck = setup.stuck_order().await;
    assert_eq!(
        setup.available_books().await,
        books - 1,
        "the book is still held"
    );
    let retry = RetryCompensationRequest {
        request_id: request_id(),
        order_id: stuck.order_id.clone(),
    };
    let refused = client
        .retry_compensation(authed(retry.clone()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    client
        .retry_compensation(admin(retry.clone()))
        .await
        .expect("an operator retries the compensation");
    let retried = setup.until(&stuck.order_id, OrderStatus::Compensated).await;
    assert_eq!(release(&retried).status, StepStatus::Succeeded as i32);
    // Consumers hear both ends: the rest, then the end the retry reached.
    assert_eq!(
        setup.events(&stuck.order_id).await,
        [
            "order.created",
            "order.needs_attention",
            "order.compensated"
        ]
    );
    assert_eq!(
        setup.available_books().await,
        books,
        "the book was released"
    );
    // The same action again is a replay; a new one finds nothing to do.
    let replayed = client
        .retry_compensation(admin(retry))
        .await
        .expect("a replay is answered")
        .into_inner()
        .order
        .unwrap();
    assert_eq!(replayed.status, OrderStatus::Compensated as i32);
    let too_late = client
        .retry_compensation(admin(RetryCompensationRequest {
            request_id: request_id(),
            order_id: stuck.order_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(too_late.code(), Code::FailedPrecondition, "{too_late:?}");
    assert!(too_late.message().contains("COMPENSATED"), "{too_late:?}");

    // Resolve by hand: a person released the book outside the system.
    let stuck = setup.stuck_order().await;
    // Through the SDK, as orderctl does, with the admin key.
    let operator = OrderClient::connect(setup.orchestrator.endpoint(), ADMIN_KEY)
        .await
        .unwrap();
    let nameless = operator
        .resolve_compensation(&stuck.order_id, request_id(), " ", "released by hand")
        .await
        .unwrap_err();
    assert_eq!(nameless.code(), Code::InvalidArgument, "{nameless:?}");
    assert!(nameless.message().contains("operator"), "{nameless:?}");
    operator
        .resolve_compensation(
            &stuck.order_id,
            request_id(),
            "ops@example.com",
            "released 1 BOOK in the warehouse system",
        )
        .await
        .expect("an operator resolves it");
    let resolved = setup.until(&stuck.order_id, OrderStatus::Compensated).await;
    assert_eq!(
        setup.events(&stuck.order_id).await,
        [
            "order.created",
            "order.needs_attention",
            "order.compensated"
        ]
    );
    let note = "resolved by hand by ops@example.com: released 1 BOOK in the warehouse system";
    assert!(
        resolved
            .failure_reason
            .contains("undoing reserve_stock failed")
            && resolved.failure_reason.ends_with(note),
        "{}",
        resolved.failure_reason
    );
    let step = release(&resolved);
    assert_eq!(step.status, StepStatus::Succeeded as i32, "{step:?}");
    assert_eq!(step.result, note);
    // The system itself released nothing: the person did, elsewhere.
    assert_eq!(setup.available_books().await, books - 1);
}

/// `orderctl` (the real command, built with the tests) against `setup`,
/// with the business key and, when given, the admin key.
pub(crate) async fn orderctl(
    setup: &Setup,
    admin_key: Option<&str>,
    args: &[&str],
) -> std::process::Output {
    let mut command = tokio::process::Command::new(bins::ORDERCTL);
    command
        .args(args)
        .env("ORDERCTL_ADDR", setup.orchestrator.endpoint())
        .env("APPLICATION_API_KEY", ordersaga_tests::API_KEY)
        .env_remove("ADMIN_API_KEY")
        .env_remove("ORDERCTL_OUTPUT");
    if let Some(key) = admin_key {
        command.env("ADMIN_API_KEY", key);
    }
    command.output().await.expect("orderctl runs")
}

pub(crate) fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn orderctl_bulk_retries_and_cancels_every_matching_order_once(backend: Backend) {
    let setup = Setup::start(backend).await;
    let books = setup.available_books().await;
    let stuck = setup.stuck_orders(2).await;
    let mut stuck_ids: Vec<&str> = stuck.iter().map(|o| o.order_id.as_str()).collect();
    stuck_ids.sort();

    // A dry run lists them, needs no admin key, and changes nothing.
    let dry = orderctl(&setup, None, &["bulk", "retry", "--dry-run"]).await;
    assert!(dry.status.success(), "{dry:?}");
    let printed = stdout(&dry);
    assert!(
        printed.contains("dry run: would retry 2 orders"),
        "{printed}"
    );
    assert!(stuck_ids.iter().all(|id| printed.contains(id)), "{printed}");
    for order in &stuck {
        assert_eq!(
            setup.get(&order.order_id).await.status,
            OrderStatus::NeedsAttention as i32
        );
    }

    // Acting takes the admin key: a usage error before anything is listed.
    let keyless = orderctl(&setup, None, &["bulk", "retry"]).await;
    assert_eq!(keyless.status.code(), Some(2), "{keyless:?}");
    assert!(
        String::from_utf8_lossy(&keyless.stderr).contains("--admin-key"),
        "{keyless:?}"
    );

    // Both retried, in one batch; each order ends COMPENSATED, the books released.
    let batch = format!("ops-{}", uuid::Uuid::new_v4().simple());
    let run = orderctl(
        &setup,
        Some(ADMIN_KEY),
        &["-o", "json", "bulk", "retry", "--batch-id", &batch],
    )
    .await;
    assert!(run.status.success(), "{run:?}");
    let outcome: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let mut done: Vec<&str> = outcome["done"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    done.sort();
    assert_eq!(done, stuck_ids, "{outcome}");
    for order in &stuck {
        setup.until(&order.order_id, OrderStatus::Compensated).await;
    }
    assert_eq!(
        setup.available_books().await,
        books,
        "every book released once"
    );

    // The same batch again, over every compensated order: the two replay
    // (their request IDs are the batch's), and nothing runs twice; an order
    // the batch never touched is refused as not resting, and skipped.
    let other = setup
        .client()
        .await
        .create_order(authed(order(&request_id(), "poor", &[("BOOK", 1)], "DE")))
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    setup.until(&other.order_id, OrderStatus::Compensated).await;
    let again = orderctl(
        &setup,
        Some(ADMIN_KEY),
        &[
            "bulk",
            "retry",
            "--status",
            "compensated",
            "--batch-id",
            &batch,
        ],
    )
    .await;
    assert!(again.status.success(), "{again:?}");
    let printed = stdout(&again);
    assert!(
        printed.contains("retry: 2 of 3 orders done, 1 skipped, 0 failed"),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("skipped {}", other.order_id)),
        "{printed}"
    );
    assert_eq!(
        setup.available_books().await,
        books,
        "a replay released nothing more"
    );

    // Bulk cancel: the running orders of a time window; each ends CANCELLED.
    let since = svc_kit::time::now_ms();
    let mut running = Vec::new();
    for _ in 0..3 {
        let placed = setup
            .client()
            .await
            .create_order(authed(order(&request_id(), "alice", &[("BOOK", 1)], "DE")))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap();
        running.push(placed.order_id);
    }
    let after = rfc3339(since - 1);
    let cancel = orderctl(
        &setup,
        None,
        &[
            "bulk",
            "cancel",
            "--created-after",
            &after,
            "--reason",
            "bulk test",
        ],
    )
    .await;
    assert!(cancel.status.success(), "{cancel:?}");
    assert!(
        stdout(&cancel).contains("cancel: 3 of 3 orders done"),
        "{}",
        stdout(&cancel)
    );
    for order_id in &running {
        setup.until(order_id, OrderStatus::Cancelled).await;
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC), the form orderctl reads.
fn rfc3339(ms: i64) -> String {
    let timestamp = ordersaga_proto::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    };
    serde_json::to_value(timestamp)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}
