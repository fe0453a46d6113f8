//! The rapid-reset attack (CVE-2023-44487) and the orchestrator's own calls.
//!
//! Every server keeps h2's defence: a connection that resets 20 streams
//! before the server accepted them is closed with GOAWAY (ENHANCE_YOUR_CALM).
//! The services once raised that limit to 16,384 because the orchestrator,
//! under a burst of deadlines, opened streams only to reset them at once; it
//! no longer does, and the second test keeps it so.

use std::time::Duration;

use h2::Reason;
use orchestrator::downstream::MIN_BUDGET;
use ordersaga_tests::{
    API_KEY, Backend, TestDb,
    h2_proxy::{H2Proxy, Rule},
    process::orchestrator_process,
    system::{DomainServices, Options, System, order},
};
use svc_kit::fault::FaultSettings;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    assertions::{request_id, terminal_order},
    bins,
};

const BURST: usize = 2_000;

/// A stream reset this soon after it opened was given up before it began.
/// Well under [`MIN_BUDGET`], for the scheduling noise of a busy CI machine.
const EARLY: Duration = Duration::from_millis(15);
const _: () = assert!(EARLY.as_millis() < MIN_BUDGET.as_millis());

/// The attack as it is made: raw HTTP/2 frames, each stream opened
/// (HEADERS) and reset (RST_STREAM) at once, all in one write, so that the
/// server reads them together. Returns the server's GOAWAY: its error code
/// and the last stream it says it processed; none if it closed without one.
async fn rapid_reset(addr: std::net::SocketAddr, path: &str) -> Option<(u32, u32)> {
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const END_HEADERS: u8 = 0x4;
    const CANCEL: u32 = 0x8;
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    // HPACK: literal fields without indexing (names and values < 127 bytes).
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("x-api-key", API_KEY),
    ] {
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut attack = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut attack, SETTINGS, 0, 0, &[]);
    for i in 0..BURST as u32 {
        let stream = 2 * i + 1;
        frame(&mut attack, HEADERS, END_HEADERS, stream, &block);
        frame(&mut attack, RST_STREAM, 0, stream, &CANCEL.to_be_bytes());
    }
    let (mut reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
    // The server may close before it read everything: the write may fail.
    let write = tokio::spawn(async move {
        let _ = writer.write_all(&attack).await;
        writer
    });
    let read = async {
        let mut received = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = reader.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            received.extend_from_slice(&buf[..n]);
            let mut at = 0;
            while received.len() >= at + 9 {
                let len = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]])
                    as usize;
                if received.len() < at + 9 + len {
                    break;
                }
                if received[at + 3] == GOAWAY {
                    let payload = &received[at + 9..at + 9 + len];
                    let last = u32::from_be_bytes(payload[0..4].try_into().unwrap()) & 0x7fff_ffff;
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    return Some((code, last));
                }
                at += 9 + len;
            }
        }
    };
    let goaway = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server neither sent GOAWAY nor closed within 10 s");
    drop(write.await);
    goaway
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rapid_reset_burst_gets_the_connection_closed_on_every_server() {
    let system = System::start(Backend::Sqlite, Options::default()).await;
    for (name, addr, path) in [
        (
            "orchestrator",
            system.orchestrator.addr,
            "/orders.v1.OrderService/GetOrder",
        ),
        (
            "stock-svc",
            system.services.stock.addr,
            "/stock.v1.StockService/GetProduct",
        ),
        (
            "payment-svc",
            system.services.payment.addr,
            "/payment.v1.PaymentService/GetAccount",
        ),
    ] {
        let goaway = rapid_reset(addr, path).await;
        println!("{name}: GOAWAY (code, last stream) {goaway:?}");
        let Some((code, last_stream)) = goaway else {
            panic!("{name} closed the connection without a GOAWAY");
        };
        assert_eq!(code, u32::from(Reason::ENHANCE_YOUR_CALM), "{name}");
        assert!(
            last_stream < 2 * 100,
            "{name} took more than 100 reset streams: last stream {last_stream}"
        );
    }
    // Only the attacking connections were closed: the servers serve on.
    let client = system.client().await;
    let mut request = order(&request_id(), "alice", &[("PEN", 1)], "DE");
    request.wait = true;
    let order = client.create_order(request).await.unwrap();
    assert_eq!(
        order.status,
        ordersaga_proto::orders::v1::OrderStatus::Completed as i32
    );
}

/// Calls queue behind a cap of one call in flight to a slow stock service,
/// far past their deadline. Before, such a call was still sent when its
/// turn came and its stream reset a moment later as its caller gave up,
/// before a busy service would accept it: the resets a defended server
/// counts. Now a call is sent only with [`MIN_BUDGET`] left, under the
/// deadline that is left, so a stream the caller gives up on has been open
/// that long. (A call that passes its deadline at the service is still
/// reset by gRPC's own client deadline, as everywhere; the service had
/// accepted that stream long before.)
#[tokio::test(flavor = "multi_thread")]
async fn calls_queued_past_their_deadline_are_never_sent_to_be_reset() {
    let backend = Backend::Sqlite;
    let slow = Options {
        stock_faults: FaultSettings {
            fault_latency_ms: 300,
            ..FaultSettings::default()
        },
        ..Options::default()
    };
    let mut services = DomainServices::start(backend, &slow).await;
    let proxy = H2Proxy::start(services.stock.addr, Rule::Pass).await;
    services.stock_endpoint = Some(proxy.endpoint());
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let mut orchestrator = orchestrator_process(
        bins::ORCHESTRATOR,
        dir.path(),
        &db.url,
        &services,
        &[
            ("DOWNSTREAM_MAX_CONCURRENT_CALLS", "1".into()),
            ("STEP_TIMEOUT_MS", "500".into()),
            ("STEP_MAX_ATTEMPTS", "100".into()),
        ],
    );
    orchestrator.start().await;
    let client = orchestrator.order_client().await;
    let created = futures::future::join_all((0..10).map(|_| {
        let client = client.clone();
        async move {
            client
                .create_order(order(&request_id(), "alice", &[("PEN", 1)], "DE"))
                .await
                .unwrap()
                .order_id
        }
    }))
    .await;
    for order_id in &created {
        terminal_order(&client, order_id, Duration::from_secs(120)).await;
    }
    let resets = proxy.caller_resets();
    let early: Vec<&Duration> = resets.iter().filter(|open| **open < EARLY).collect();
    println!(
        "{} streams reset by the orchestrator; {} within {EARLY:?} of opening",
        resets.len(),
        early.len()
    );
    assert!(
        early.is_empty(),
        "the orchestrator opened streams to stock only to reset them at once: {early:?}"
    );
}
