//! Overload is answered, not absorbed: WatchOrder streams are bounded in
//! total, per connection and in time, and past a bound the call is refused
//! at once, naming the limit.

use std::time::{Duration, Instant};

use ordersaga_proto::{client::OrderClient, orders::v1::WatchOrderResponse};
use ordersaga_tests::{
    API_KEY, Backend, TestDb,
    process::orchestrator_process,
    system::{DomainServices, Options, order},
};
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

    let _third = connection(&endpoint).watch_order(&id).await.unwrap();
    let refused = connection(&endpoint).watch_order(&id).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("MAX_WATCH_STREAMS"),
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
