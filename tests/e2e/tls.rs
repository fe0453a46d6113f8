//! TLS on every gRPC port and mTLS between the orchestrator and the
//! services, with certificates made for the test: a plaintext or untrusted
//! client is refused, and an order completes end to end over mTLS.

use std::time::Duration;

use orchestrator::downstream::DownstreamArgs;
use ordersaga_proto::{
    client::OrderClient,
    orders::v1::OrderStatus,
    payment::v1::{DepositRequest, payment_service_client::PaymentServiceClient},
    stock::v1::{GetProductRequest, RestockRequest, stock_service_client::StockServiceClient},
};
use ordersaga_tests::{
    API_KEY, Backend, Running, admin, authed, pki::Pki, services, system::order,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::assertions::request_id;

fn https(service: &Running) -> String {
    format!("https://localhost:{}", service.addr.port())
}

/// A channel with `tls`, or the refusal (at the handshake or the first call).
async fn connect(url: String, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url)
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// Whether a stock call over this connection is refused. Nothing is seeded
/// yet, so a call that was served answers NOT_FOUND; a refused one fails in
/// the transport (a TLS alert, or garbage where HTTP/2 was expected).
async fn stock_refuses(url: String, tls: Option<ClientTlsConfig>) -> bool {
    let Ok(channel) = connect(url, tls).await else {
        return true;
    };
    let answer = StockServiceClient::new(channel)
        .get_product(authed(GetProductRequest { sku: "BOOK".into() }))
        .await;
    answer.is_err_and(|status| status.code() != tonic::Code::NotFound)
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_and_untrusted_clients_are_refused_and_an_order_completes_over_mtls() {
    let pki = Pki::new();
    let backend = Backend::Sqlite;
    let stock = services::stock_configured(backend, |s| s.tls = pki.server_mtls()).await;
    let shipping = services::shipping_configured(backend, |s| s.tls = pki.server_mtls()).await;
    let payment = services::payment_configured(backend, |s| s.tls = pki.server_mtls()).await;

    // The services take only clients with a certificate the CA signed.
    let trusted = || Some(pki.client("ca.pem", Some("client")));
    assert!(
        stock_refuses(format!("http://{}", stock.addr), None).await,
        "a plaintext client was served"
    );
    assert!(
        stock_refuses(https(&stock), Some(pki.client("ca.pem", None))).await,
        "a client without a certificate was served under mTLS"
    );
    assert!(
        stock_refuses(https(&stock), Some(pki.client("ca.pem", Some("stranger")))).await,
        "a client whose certificate another CA signed was served"
    );
    assert!(
        stock_refuses(
            https(&stock),
            Some(pki.client("other-ca.pem", Some("client")))
        )
        .await,
        "a client that trusts another CA went on talking to the server"
    );

    // Seeding over mTLS, with the admin key.
    let mut stock_client =
        StockServiceClient::new(connect(https(&stock), trusted()).await.unwrap());
    stock_client
        .restock(admin(RestockRequest {
            request_id: request_id(),
            sku: "BOOK".into(),
            quantity: 10,
            name: "Book".into(),
            unit_price_cents: 1_500,
            currency: "EUR".into(),
        }))
        .await
        .expect("restock over mTLS");
    PaymentServiceClient::new(connect(https(&payment), trusted()).await.unwrap())
        .deposit(admin(DepositRequest {
            request_id: request_id(),
            customer_id: "alice".into(),
            amount_cents: 100_000,
            currency: "EUR".into(),
        }))
        .await
        .expect("deposit over mTLS");

    // The orchestrator: TLS on its own port, mTLS to the services.
    let mut downstream = DownstreamArgs::local(https(&stock), https(&shipping), https(&payment));
    downstream.services_tls_ca = Some(pki.path("ca.pem"));
    downstream.services_tls_cert = Some(pki.path("client.pem"));
    downstream.services_tls_key = Some(pki.path("client-key.pem"));
    let orchestrator = services::orchestrator(backend, |url| {
        let mut settings = orchestrator::Settings::local(url, API_KEY, downstream);
        settings.server.tls = pki.server_tls();
        settings
    })
    .await;
    let url = https(&orchestrator);

    let plaintext = connect(format!("http://{}", orchestrator.addr), None).await;
    if let Ok(channel) = plaintext {
        let refused = OrderClient::from_channel(channel, API_KEY)
            .get_order("01234567-89ab-7def-8123-456789abcdef")
            .await
            .unwrap_err();
        assert_ne!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    }
    assert!(
        connect(url.clone(), Some(pki.client("other-ca.pem", None)))
            .await
            .is_err(),
        "a client that trusts another CA completed the handshake"
    );

    let client = OrderClient::from_channel(
        connect(url, Some(pki.client("ca.pem", None)))
            .await
            .unwrap(),
        API_KEY,
    );
    let mut request = order(&request_id(), "alice", &[("BOOK", 2)], "DE");
    request.wait = true;
    let placed = client.create_order(request).await.unwrap();
    assert_eq!(
        placed.status,
        OrderStatus::Completed as i32,
        "the saga's calls over mTLS: {placed:?}"
    );
    let product = stock_client
        .get_product(authed(GetProductRequest { sku: "BOOK".into() }))
        .await
        .unwrap()
        .into_inner()
        .product
        .unwrap();
    assert_eq!(product.available, 8, "the stock was taken over mTLS");
}
