//! TLS on every gRPC port and mTLS between the orchestrator and the
//! services, with certificates made for the test: a plaintext or untrusted
//! client is refused, and an order completes end to end over mTLS.

use std::time::Duration;

use orchestrator::{downstream::DownstreamArgs, outbox::relay::BrokerArgs};
use ordersaga_proto::{
    client::OrderClient,
    orders::v1::OrderStatus,
    payment::v1::{DepositRequest, payment_service_client::PaymentServiceClient},
    stock::v1::{GetProductRequest, RestockRequest, stock_service_client::StockServiceClient},
};
use ordersaga_tests::{
    ADMIN_KEY, API_KEY, Backend, Running, admin, authed,
    broker::{TlsFront, collect_until, consume, unique_exchange},
    eventually,
    pki::Pki,
    services,
    system::{Options, System, order},
};
use secrecy::SecretString;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::assertions::request_id;

const WAIT: Duration = Duration::from_secs(60);

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

/// A stock service on `database_url`, serving until the test ends; or why it
/// did not start.
async fn stock_on(database_url: String) -> Result<std::net::SocketAddr, String> {
    let mut settings = stock_svc::Settings::local(database_url, API_KEY);
    settings.server.admin_api_key = Some(ADMIN_KEY.into());
    let app = stock_svc::build(settings)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let addr = app.local_addr();
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_reaches_postgresql_only_over_verified_tls() {
    let pki = Pki::new();
    let root = tempfile::tempdir().unwrap();
    let mut postgres = chaos::postgres::Postgres::create(root.path(), None)
        .await
        .expect("a PostgreSQL server of the test's own");
    postgres
        .require_tls(&pki.path("server.pem"), &pki.path("server-key.pem"))
        .await
        .unwrap();
    let url = postgres.create_database("stock").await.unwrap();
    let verify_with = |ca: &str| {
        format!(
            "{url}?sslmode=verify-full&sslrootcert={}",
            pki.path(ca).display()
        )
    };

    let plaintext = stock_on(format!("{url}?sslmode=disable"))
        .await
        .unwrap_err();
    assert!(
        plaintext.contains("no encryption"),
        "a plaintext connection was not refused by the server: {plaintext}"
    );
    let untrusted = stock_on(verify_with("other-ca.pem")).await.unwrap_err();
    assert!(
        untrusted.to_lowercase().contains("certificate"),
        "a server whose certificate another CA signed was trusted: {untrusted}"
    );
    let missing = stock_on(format!(
        "{url}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
    ))
    .await
    .unwrap_err();
    assert!(
        missing.contains("sslrootcert=/nonexistent/ca.pem cannot be read"),
        "{missing}"
    );

    let addr = stock_on(verify_with("ca.pem"))
        .await
        .expect("the service starts over verified TLS");
    let mut stock = StockServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    stock
        .restock(admin(RestockRequest {
            request_id: request_id(),
            sku: "BOOK".into(),
            quantity: 3,
            name: "Book".into(),
            unit_price_cents: 1_500,
            currency: "EUR".into(),
        }))
        .await
        .expect("a write over TLS");
    let product = stock
        .get_product(authed(GetProductRequest { sku: "BOOK".into() }))
        .await
        .expect("a read over TLS")
        .into_inner()
        .product
        .unwrap();
    assert_eq!(product.available, 3);
    postgres.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn order_events_reach_rabbitmq_over_tls_and_never_an_untrusted_broker() {
    let pki = Pki::new();
    let front = TlsFront::start(
        &pki.path("server.pem"),
        &pki.path("server-key.pem"),
        "127.0.0.1:5672".parse().unwrap(),
    )
    .await;
    let broker = |ca: &str, exchange: &str| BrokerArgs {
        rabbitmq_url: Some(SecretString::from(front.url())),
        rabbitmq_tls_ca: Some(pki.path(ca)),
        events_exchange: exchange.to_owned(),
        ..Default::default()
    };

    // A relay that trusts another CA breaks off every handshake.
    let untrusting = System::start(
        Backend::Sqlite,
        Options {
            broker: Some(broker("other-ca.pem", &unique_exchange())),
            ..Default::default()
        },
    )
    .await;
    eventually(
        "the relay to refuse the broker's certificate",
        WAIT,
        || async { (front.refused() > 0).then_some(()) },
    )
    .await;
    assert_eq!(front.accepted(), 0, "a relay trusted an unknown CA");
    drop(untrusting);

    let exchange = unique_exchange();
    let mut events = consume(&exchange).await;
    let system = System::start(
        Backend::Sqlite,
        Options {
            broker: Some(broker("ca.pem", &exchange)),
            ..Default::default()
        },
    )
    .await;
    let mut request = order(&request_id(), "alice", &[("BOOK", 1)], "DE");
    request.wait = true;
    let placed = system.client().await.create_order(request).await.unwrap();
    let received = collect_until(&mut events, WAIT, |events| {
        events.iter().any(|e| {
            e.field("order_id") == placed.order_id.as_str() && e.routing_key == "order.completed"
        })
    })
    .await;
    assert!(
        received.iter().any(|e| e.routing_key == "order.completed"),
        "the order's events arrived over AMQPS: {received:?}"
    );
    assert!(
        front.accepted() > 0,
        "the events came through the TLS front"
    );
}

/// The container health check asks a TLS server over TLS, with the CA and
/// (under mTLS) the client certificate it is given in its environment, so
/// one compose health check line serves both; without them it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_health_check_asks_a_tls_server_over_tls_with_the_settings_it_is_given() {
    let pki = Pki::new();
    let stock = services::stock_configured(Backend::Sqlite, |s| s.tls = pki.server_mtls()).await;
    let port = stock.addr.port().to_string();
    let check = |env: &[(&str, String)]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_e2e-grpc-health-check"))
            .args(["--service", "stock.v1.StockService"])
            .env("PORT", &port)
            .env_remove("HEALTHCHECK_TLS_CA")
            .env_remove("HEALTHCHECK_TLS_CERT")
            .env_remove("HEALTHCHECK_TLS_KEY")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let ca = (
        "HEALTHCHECK_TLS_CA",
        pki.path("ca.pem").display().to_string(),
    );
    let (served, said) = check(&[]);
    assert!(!served, "plaintext was answered: {said}");
    let (served, said) = check(std::slice::from_ref(&ca));
    assert!(
        !served,
        "no client certificate, under mTLS, was answered: {said}"
    );
    let (served, said) = check(&[
        ca,
        (
            "HEALTHCHECK_TLS_CERT",
            pki.path("client.pem").display().to_string(),
        ),
        (
            "HEALTHCHECK_TLS_KEY",
            pki.path("client-key.pem").display().to_string(),
        ),
    ]);
    assert!(served, "{said}");
    assert!(said.contains("SERVING"), "{said}");
}
