//! `/metrics` on each service: after a known mix of orders, the counters say
//! exactly what happened.

use orchestrator::EngineArgs;
use ordersaga_proto::orders::v1::{OrderStatus, StepPhase};
use ordersaga_tests::system::{Options, System, order};
use svc_kit::fault::FaultSettings;

use crate::assertions::request_id;

/// The value of the sample `name` (with its labels, as exposed), or 0 if absent.
pub(crate) fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|value| value.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_match_a_known_mix_of_orders() {
    // Half of the shipping replies are dropped: steps get retried.
    let options = Options {
        shipping_faults: FaultSettings {
            fault_drop_reply_rate: 0.5,
            ..Default::default()
        },
        engine: Some(EngineArgs {
            step_max_attempts: 40,
            retry_initial_backoff_ms: 1,
            retry_max_backoff_ms: 10,
            compensation_max_backoff_ms: 10,
            ..Default::default()
        }),
        ..Default::default()
    };
    let system = System::start(ordersaga_tests::Backend::Sqlite, options).await;
    let client = system.client().await;
    let mut orders = Vec::new();
    for i in 0..20 {
        let (customer, sku, quantity) = match i {
            0 | 1 => ("poor", "BOOK", 1),
            2 | 3 => ("alice", "RARE", 5),
            _ => ("alice", "BOOK", 1),
        };
        let mut request = order(&request_id(), customer, &[(sku, quantity)], "DE");
        request.wait = true;
        orders.push(client.create_order(request).await.unwrap());
    }
    let count =
        |status: OrderStatus| orders.iter().filter(|o| o.status == status as i32).count() as f64;
    assert_eq!(
        (
            count(OrderStatus::Completed),
            count(OrderStatus::Compensated),
            count(OrderStatus::Failed)
        ),
        (16.0, 2.0, 2.0)
    );
    let shipping_retries: i32 = orders
        .iter()
        .flat_map(|o| &o.steps)
        .filter(|s| s.name == "prepare_shipment" && s.phase == StepPhase::Forward as i32)
        .map(|s| s.attempts - 1)
        .sum();
    assert!(shipping_retries > 0, "dropped replies should force retries");
    // A failed compensation attempt is recorded at once (a forward one
    // with its step's end).
    let compensation_retries: i32 = orders
        .iter()
        .flat_map(|o| &o.steps)
        .filter(|s| s.phase == StepPhase::Compensation as i32)
        .map(|s| s.attempts - 1)
        .sum();

    let page = system.orchestrator.scrape().await;
    assert_eq!(sample(&page, "saga_started_total"), 20.0, "{page}");
    assert_eq!(
        sample(&page, r#"saga_finished_total{outcome="COMPLETED"}"#),
        16.0
    );
    assert_eq!(
        sample(&page, r#"saga_finished_total{outcome="COMPENSATED"}"#),
        2.0
    );
    assert_eq!(
        sample(&page, r#"saga_finished_total{outcome="FAILED"}"#),
        2.0
    );
    assert_eq!(sample(&page, "sagas_in_flight"), 0.0);
    // Log commits: a completed saga 3 (one per step, the last with its end),
    // a compensated one 5 (3 steps, 2 undos, the last with its end), one
    // refused at its first step 2 (the refusal, then its end).
    assert_eq!(
        sample(&page, "saga_checkpoints_total"),
        f64::from(16 * 3 + 2 * 5 + 2 * 2 + compensation_retries),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            r#"saga_step_duration_seconds_count{step="reserve_stock",phase="forward"}"#
        ),
        20.0
    );
    assert_eq!(
        sample(
            &page,
            r#"saga_step_retries_total{step="prepare_shipment",phase="forward",code="Unavailable"}"#
        ),
        f64::from(shipping_retries)
    );
    assert_eq!(
        sample(
            &page,
            r#"grpc_server_handled_total{method="orders.v1.OrderService/CreateOrder",code="Ok"}"#
        ),
        20.0
    );
    assert!(sample(&page, "db_pool_max_connections") >= 1.0, "{page}");
    assert!(
        page.contains(r#"db_pool_connections{state="idle"}"#),
        "{page}"
    );

    let stock = system.services.stock.scrape().await;
    assert_eq!(
        sample(
            &stock,
            r#"grpc_server_handled_total{method="stock.v1.StockService/ReserveStock",code="Ok"}"#
        ),
        18.0,
        "{stock}"
    );
    assert_eq!(
        sample(
            &stock,
            r#"grpc_server_handled_total{method="stock.v1.StockService/ReserveStock",code="FailedPrecondition"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &stock,
            r#"grpc_server_handling_seconds_count{method="stock.v1.StockService/ReleaseStock"}"#
        ),
        2.0
    );
    // The admin calls that stocked the shelves wrote through the pool,
    // behind the batch writer's gate: the writer never met a locked file.
    assert_eq!(
        sample(&stock, "db_batch_writer_busy_waits_total"),
        0.0,
        "{stock}"
    );
}

/// Requests to paths that are not methods of the contract, without a key,
/// as anyone who can open a connection may send them: they share one
/// `other` series, so 10,000 random paths leave `/metrics` as it was.
#[tokio::test(flavor = "multi_thread")]
async fn random_paths_leave_the_series_unchanged() {
    let stock = ordersaga_tests::services::stock(ordersaga_tests::Backend::Sqlite).await;
    let call = |channel: tonic::transport::Channel, path: String| {
        let mut grpc = tonic::client::Grpc::new(channel);
        async move {
            grpc.ready().await.unwrap();
            let path = http::uri::PathAndQuery::try_from(path).unwrap();
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            grpc.unary(tonic::Request::new(()), path, codec).await
        }
    };
    // One first, so that the `other` series exists.
    let refused = call(stock.channel().await, "/warm/up".into())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented);
    let series = |page: &str| page.lines().filter(|l| !l.starts_with('#')).count();
    let before = series(&stock.scrape().await);
    // A connection of its own per 100 calls: the server closes a connection
    // on which it had to reset too many streams (h2's own defence).
    for batch in 0..100 {
        let channel = stock.channel().await;
        let calls = (0..100).map(|i| {
            call(
                channel.clone(),
                format!(
                    "/{}.v1.Service{batch}/Method{i}",
                    uuid::Uuid::new_v4().simple()
                ),
            )
        });
        for result in futures::future::join_all(calls).await {
            let status = result.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
        }
    }
    let page = stock.scrape().await;
    assert_eq!(
        series(&page),
        before,
        "10,000 random paths added series to /metrics"
    );
    assert!(
        page.contains(r#"grpc_server_handled_total{method="other",code="Unimplemented"} 10001"#),
        "{page}"
    );
}
