//! Overload is answered, not absorbed: WatchOrder streams are bounded in
//! total, per connection and in time, and past a bound the call is refused
//! at once, naming the limit; the pricing of new orders cannot take the
//! stock link from the sagas under way.

use ordersaga_proto::errors::Reason;
use std::time::{Duration, Instant};

use ordersaga_proto::{
    client::OrderClient,
    orders::v1::{OrderStatus, WatchOrderResponse},
};
use ordersaga_tests::{
    API_KEY, Backend, TestDb,
    process::orchestrator_process,
    system::{DomainServices, Options, order},
};
use svc_kit::fault::FaultSettings;
use tonic::{Code, Streaming};

use crate::{assertions::request_id, bins};

/// A client on a connection of its own.
fn connection(endpoint: &str) -> OrderClient {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .unwrap()
        .connect_lazy();
    OrderClient::from_channel(channel, API_KEY)
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_are_bounded_per_connection_in_total_and_in_time() {
    let services = DomainServices::start(Backend::Sqlite, &Options::default()).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = [
        ("MAX_WATCH_STREAMS", "3".to_owned()),
        ("MAX_WATCH_STREAMS_PER_CONNECTION", "2".to_owned()),
        ("WATCH_STREAM_MAX_SECS", "2".to_owned()),
        // Shipping unreachable: the order stays open, retrying, for the whole test.
        ("SHIPPING_SERVICE_URL", "http://127.0.0.1:1".to_owned()),
        ("STEP_MAX_ATTEMPTS", "100".to_owned()),
        ("RETRY_MAX_BACKOFF_MS", "1000".to_owned()),
    ];
    let mut orchestrator =
        orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &limits);
    orchestrator.start().await;
    let endpoint = orchestrator.endpoint();
    let placed = orchestrator
        .order_client()
        .await
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    let id = placed.order_id;

    let one = connection(&endpoint);
    let since = Instant::now();
    let mut first: Streaming<WatchOrderResponse> = one.watch_order(&id).await.unwrap();
    let _second = one.watch_order(&id).await.unwrap();
    let refused = one.watch_order(&id).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("MAX_WATCH_STREAMS_PER_CONNECTION"),
        "{refused:?}"
    );
    assert_eq!(
        reason_of(&refused),
        Some(Reason::TooManyWatches),
        "{refused:?}"
    );

    let _third = connection(&endpoint).watch_order(&id).await.unwrap();
    let refused = connection(&endpoint).watch_order(&id).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("MAX_WATCH_STREAMS"),
        "{refused:?}"
    );
    assert_eq!(
        reason_of(&refused),
        Some(Reason::TooManyWatches),
        "{refused:?}"
    );

    // A stream ends at its lifetime, telling the client to watch again.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), first.message()).await {
            Ok(Ok(Some(_change))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the stream outlived its lifetime of 2 s"),
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(
        ended.message().contains("WATCH_STREAM_MAX_SECS"),
        "{ended:?}"
    );
    assert!(
        since.elapsed() < Duration::from_secs(10),
        "{:?}",
        since.elapsed()
    );

    // The ended streams gave their places back.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    connection(&endpoint)
        .watch_order(&id)
        .await
        .expect("a place was given back");
}

/// Past its limit of calls in flight a service answers RESOURCE_EXHAUSTED at
/// once, rather than queueing; its health check still answers.
#[tokio::test(flavor = "multi_thread")]
async fn calls_past_the_limit_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut stock = ordersaga_tests::process::ServiceProcess::new(
        bins::STOCK,
        dir.path(),
        "stock",
        &[
            // Each call takes a second, so two fill the limit.
            ("FAULT_LATENCY_MS", "1000".to_owned()),
            ("ALLOW_UNSAFE_SETTINGS", "true".to_owned()),
            ("MAX_CONCURRENT_CALLS", "2".to_owned()),
        ],
    );
    stock.start().await;
    let channel = tonic::transport::Endpoint::from_shared(stock.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let calls = (0..10).map(|i| {
        let mut client = ordersaga_proto::stock::v1::stock_service_client::StockServiceClient::new(
            channel.clone(),
        );
        async move {
            // The first two are sent first, so they hold the limit.
            tokio::time::sleep(Duration::from_millis(if i < 2 { 0 } else { 200 })).await;
            let started = Instant::now();
            let answer = client
                .get_product(ordersaga_tests::authed(
                    ordersaga_proto::stock::v1::GetProductRequest { sku: "NONE".into() },
                ))
                .await;
            if let Err(status) = &answer
                && status.code() == Code::ResourceExhausted
            {
                assert_eq!(reason_of(status), Some(Reason::Overloaded), "{status:?}");
            }
            (answer.err().map(|s| s.code()), started.elapsed())
        }
    });
    let answers = futures::future::join_all(calls).await;
    let refused: Vec<Duration> = answers
        .iter()
        .filter(|(code, _)| *code == Some(Code::ResourceExhausted))
        .map(|(_, took)| *took)
        .collect();
    assert_eq!(refused.len(), 8, "{answers:?}");
    assert!(
        refused
            .iter()
            .all(|took| *took < Duration::from_millis(300)),
        "a refusal must come at once: {answers:?}"
    );
    let served = answers
        .iter()
        .filter(|(code, _)| *code == Some(Code::NotFound))
        .count();
    assert_eq!(served, 2, "{answers:?}");

    // Busy, the service still tells its health.
    let _busy = {
        let mut client = ordersaga_proto::stock::v1::stock_service_client::StockServiceClient::new(
            channel.clone(),
        );
        tokio::spawn(async move {
            client
                .get_product(ordersaga_tests::authed(
                    ordersaga_proto::stock::v1::GetProductRequest { sku: "NONE".into() },
                ))
                .await
        })
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// With one saga driven at a time and room for one more to wait, a third
/// order is refused at once, naming the limit, and nothing of it is
/// recorded. The refusal comes before anything else is done: a retry of an
/// order already taken is refused too (it is answered once the backlog is
/// under the cap), and so is a malformed order, which is not even validated.
#[tokio::test(flavor = "multi_thread")]
async fn past_the_waiting_sagas_cap_an_order_is_refused_before_it_is_recorded() {
    let services = DomainServices::start(Backend::Sqlite, &Options::default()).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = [
        ("MAX_INFLIGHT_SAGAS", "1".to_owned()),
        ("MAX_WAITING_SAGAS", "1".to_owned()),
        // Shipping unreachable: the first saga holds its slot, retrying.
        ("SHIPPING_SERVICE_URL", "http://127.0.0.1:1".to_owned()),
        ("STEP_MAX_ATTEMPTS", "100".to_owned()),
        ("RETRY_MAX_BACKOFF_MS", "1000".to_owned()),
    ];
    let mut orchestrator =
        orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &limits);
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let first = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    // Its driver holds the one slot once it has reserved the stock.
    ordersaga_tests::eventually(
        "the first saga to be driven",
        Duration::from_secs(20),
        || async {
            let order = client.get_order(&first.order_id).await.ok()?;
            order
                .steps
                .iter()
                .any(|step| step.name == "reserve_stock" && step.finished_at.is_some())
                .then_some(())
        },
    )
    .await;
    let second_request = order(&request_id(), "alice", &[("BOOK", 1)], "DE");
    let second = client.create_order(second_request.clone()).await.unwrap();

    let since = Instant::now();
    let refused = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap_err();
    let took = since.elapsed();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("MAX_WAITING_SAGAS"),
        "{refused:?}"
    );
    assert_eq!(
        reason_of(&refused),
        Some(Reason::TooManyWaitingSagas),
        "{refused:?}"
    );
    assert!(took < Duration::from_secs(1), "the refusal took {took:?}");
    let pool = db.pool().await;
    let recorded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sagas")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 2, "the refused order was recorded");

    // Past the cap nothing is looked up either: a retry of the second
    // order is refused the same way, and says to retry with its request_id.
    let replay = client
        .create_order(second_request.clone())
        .await
        .unwrap_err();
    assert_eq!(replay.code(), Code::ResourceExhausted, "{replay:?}");
    assert!(replay.message().contains("same request_id"), "{replay:?}");
    let malformed = client
        .create_order(order("", "", &[], ""))
        .await
        .unwrap_err();
    assert_eq!(malformed.code(), Code::ResourceExhausted, "{malformed:?}");
    let recorded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sagas")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 2, "a refused call recorded something");

    // Under the cap again (here: a restart with room for more), the same
    // request is answered with the order it made.
    orchestrator.kill().await;
    orchestrator.set_env("MAX_WAITING_SAGAS", "10");
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let replayed = client.create_order(second_request).await.unwrap();
    assert_eq!(replayed.order_id, second.order_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn orders_full_of_unknown_skus_cannot_starve_the_sagas_own_stock_calls() {
    // Every stock call takes 300 ms; the link to stock carries 4 at a time.
    let options = Options {
        stock_faults: FaultSettings {
            fault_latency_ms: 300,
            ..Default::default()
        },
        ..Default::default()
    };
    let services = DomainServices::start(Backend::Sqlite, &options).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = [
        ("DOWNSTREAM_MAX_CONCURRENT_CALLS", "4".to_owned()),
        ("PRICING_MAX_CONCURRENT_LOOKUPS", "2".to_owned()),
        ("STEP_TIMEOUT_MS", "2000".to_owned()),
        ("STEP_MAX_ATTEMPTS", "2".to_owned()),
        ("RETRY_INITIAL_BACKOFF_MS", "5".to_owned()),
        ("RETRY_MAX_BACKOFF_MS", "50".to_owned()),
    ];
    let mut orchestrator =
        orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &limits);
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let placed = |items: &[(&str, i64)]| {
        let mut request = order(&request_id(), "alice", items, "DE");
        request.wait = true;
        request
    };
    // From now on BOOK's price is kept: the next BOOK order needs stock only
    // for its reservation.
    let first = client.create_order(placed(&[("BOOK", 1)])).await.unwrap();
    assert_eq!(first.status, OrderStatus::Completed as i32, "{first:?}");

    // The flood: 30 orders of 4 SKUs nobody has, each a lookup of 300 ms.
    // On the link alone that is 9 s of every slot taken.
    let flood: Vec<_> = (0..30)
        .map(|i| {
            let client = client.clone();
            let skus: Vec<String> = (0..4).map(|j| format!("GHOST-{i}-{j}")).collect();
            tokio::spawn(async move {
                let items: Vec<(&str, i64)> = skus.iter().map(|s| (s.as_str(), 1)).collect();
                client
                    .create_order(order(&request_id(), "alice", &items, "DE"))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let paying = client.create_order(placed(&[("BOOK", 1)])).await.unwrap();
    assert_eq!(
        paying.status,
        OrderStatus::Completed as i32,
        "the saga's reservation waited out its deadline behind the pricing of the flood: {paying:?}"
    );
    for order in flood {
        let refused = order.await.unwrap().unwrap_err();
        assert!(
            matches!(refused.code(), Code::NotFound | Code::Unavailable),
            "{refused:?}"
        );
    }
}

/// A price lookup outlives the orders that wait for it. Here both orders
/// that needed one left after 400 ms: the first while its lookup held the
/// only turn of the pricing budget, mid-call, the second while its lookup
/// waited for that turn. Nothing polled those lookups again, so the turn
/// stayed taken for good (and the waiting one was handed the next): every
/// later order that needed a lookup was refused "pricing is busy" after
/// 5 s, until a restart.
#[tokio::test(flavor = "multi_thread")]
async fn price_lookups_whose_orders_all_left_still_end_and_give_back_their_turns() {
    // Every stock call takes 1 s; one lookup at a time.
    let options = Options {
        stock_faults: FaultSettings {
            fault_latency_ms: 1_000,
            ..Default::default()
        },
        ..Default::default()
    };
    let services = DomainServices::start(Backend::Sqlite, &options).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = [("PRICING_MAX_CONCURRENT_LOOKUPS", "1".to_owned())];
    let mut orchestrator =
        orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &limits);
    orchestrator.start().await;
    let client = orchestrator.order_client().await;

    for sku in ["RARE-1", "RARE-2"] {
        let left = tokio::time::timeout(
            Duration::from_millis(400),
            client.create_order(order(&request_id(), "alice", &[(sku, 1)], "DE")),
        )
        .await;
        assert!(left.is_err(), "the order for {sku} was answered: {left:?}");
    }
    // Both lookups end within about 2 s (the SKUs are unknown), freeing the
    // turn; an order that needs a lookup then gets it. Each try waits at
    // most 5 s for the turn.
    let deadline = Instant::now() + Duration::from_secs(20);
    let accepted = loop {
        match client
            .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
            .await
        {
            Ok(accepted) => break accepted,
            Err(refused) => {
                assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
                assert!(
                    Instant::now() < deadline,
                    "orders that need a price lookup are still refused after 20 s: {refused:?}"
                );
            }
        }
    };
    assert!(!accepted.order_id.is_empty(), "{accepted:?}");
    // Both lookups of the orders that left did reach the stock service: the
    // test shows what it says it does.
    let not_found = crate::metrics::sample(
        &services.stock.scrape().await,
        r#"grpc_server_handled_total{method="stock.v1.StockService/GetProduct",code="NotFound"}"#,
    );
    assert_eq!(not_found, 2.0, "lookups of RARE-1 and RARE-2 answered");
}

#[tokio::test(flavor = "multi_thread")]
async fn many_watchers_of_one_order_share_one_reload_per_change() {
    // Shipping takes 1.5 s: time for every watcher to join mid-saga.
    let options = Options {
        shipping_faults: FaultSettings {
            fault_latency_ms: 1_500,
            ..Default::default()
        },
        ..Default::default()
    };
    let services = DomainServices::start(Backend::Sqlite, &options).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let mut orchestrator =
        orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &[]);
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let placed = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    let loads = || async {
        crate::metrics::sample(&orchestrator.scrape().await, "order_watch_loads_total")
    };
    let before = loads().await;
    const WATCHERS: usize = 50;
    let watchers: Vec<_> = (0..WATCHERS)
        .map(|_| {
            let (client, id) = (client.clone(), placed.order_id.clone());
            tokio::spawn(async move {
                let mut stream = client.watch_order(&id).await.unwrap();
                let mut seen = Vec::new();
                while let Some(message) = stream.message().await.unwrap() {
                    seen.push(message.order.unwrap());
                }
                seen
            })
        })
        .collect();
    for watcher in watchers {
        let seen = watcher.await.unwrap();
        let last = seen.last().expect("a first snapshot");
        assert_eq!(last.status, OrderStatus::Completed as i32, "{last:?}");
    }
    let reloads = loads().await - before;
    println!("{WATCHERS} watchers of one order: {reloads} reloads");
    // The saga changes a handful of times while they watch (shipping done,
    // payment started and done, completed): one reload each, plus the
    // first load, not one per watcher per change.
    assert!(
        reloads <= 12.0,
        "{WATCHERS} watchers of one order made {reloads} reloads of it"
    );
}

/// The refusal's ErrorInfo reason (see `rich_errors.rs`).
fn reason_of(status: &tonic::Status) -> Option<Reason> {
    ordersaga_proto::errors::refusal(status).map(|r| r.reason)
}
