//! The orchestrator shares one HTTP/2 connection per service among all its
//! sagas, and cancels each call that passes its deadline: a burst of
//! deadlines (a slow service, 10,000 sagas resumed at once) is a burst of
//! RST_STREAM frames, often before the service has accepted the stream. h2's
//! rapid-reset defence answers more than 20 such resets with a GOAWAY
//! (ENHANCE_YOUR_CALM), failing every call on the connection at once. The
//! benchmark met exactly that; the services raise the limit, and this test
//! keeps them from losing it.

use bytes::Bytes;
use h2::Reason;
use http::Request;
use ordersaga_tests::{API_KEY, Backend, services};
use tokio::net::TcpStream;

const BURST: usize = 2_000;

fn get_product(sku: &str) -> (Request<()>, Bytes) {
    let request = Request::post("/stock.v1.StockService/GetProduct")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-api-key", API_KEY)
        .body(())
        .unwrap();
    // One length-prefixed message: field 1 (sku), a string.
    let mut message = vec![0x0a, sku.len() as u8];
    message.extend_from_slice(sku.as_bytes());
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    (request, Bytes::from(framed))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_cancelled_calls_does_not_close_the_shared_connection() {
    let stock = services::stock(Backend::Sqlite).await;
    let tcp = TcpStream::connect(stock.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();

    // Open a stream and reset it at once, BURST times, back to back.
    for i in 0..BURST {
        let (request, _) = get_product(&format!("SKU-{i}"));
        let (_response, mut stream) = client
            .send_request(request, false)
            .unwrap_or_else(|e| panic!("the connection was closed after {i} cancelled calls: {e}"));
        stream.send_reset(Reason::CANCEL);
        client = client
            .ready()
            .await
            .unwrap_or_else(|e| panic!("the connection was closed after {i} cancelled calls: {e}"));
    }

    // The same connection still carries a call to its end.
    let (request, body) = get_product("NO-SUCH-SKU");
    let (response, mut stream) = client
        .send_request(request, false)
        .expect("the connection was closed by the burst of cancelled calls");
    stream.send_data(body, true).unwrap();
    let response = response
        .await
        .expect("the connection was closed by the burst of cancelled calls");
    assert_eq!(response.status(), 200);
    // An error comes "trailers-only", in the headers; else in the trailers.
    let mut status = response.headers().get("grpc-status").cloned();
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    if let Some(trailers) = body.trailers().await.unwrap() {
        status = status.or(trailers.get("grpc-status").cloned());
    }
    // NOT_FOUND (5): the service read the call and answered it.
    assert_eq!(status.as_ref().and_then(|v| v.to_str().ok()), Some("5"));
    drop(client);
    connection.abort();
}
