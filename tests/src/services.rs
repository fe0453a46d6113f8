//! Services started in-process on an ephemeral loopback port, each on its own store.

use std::net::SocketAddr;

use ordersaga_proto::{
    payment::v1::payment_service_client::PaymentServiceClient,
    shipping::v1::shipping_service_client::ShippingServiceClient,
    stock::v1::stock_service_client::StockServiceClient,
};
use svc_kit::fault::FaultSettings;
use tokio::sync::oneshot;
use tonic::{Request, transport::Channel};

use crate::{Backend, TestDb};

/// The business key of every service the tests start (32 characters or
/// more, as a service started from the environment requires).
pub const API_KEY: &str = "test-business-key-0123456789abcdef";
/// The admin key (Restock, Deposit) of every service the tests start.
pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef0123";

/// Wraps a message with the business key.
pub fn authed<T>(message: T) -> Request<T> {
    with_key(message, API_KEY)
}

/// Wraps a message with the admin key, for Restock and Deposit.
pub fn admin<T>(message: T) -> Request<T> {
    with_key(message, ADMIN_KEY)
}

fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(svc_kit::auth::API_KEY_HEADER, key.parse().unwrap());
    request
}

/// A running service. Stopping it (or dropping it) drains and stops the server.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    pub db: TestDb,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .expect("connect to the service")
    }

    pub async fn stock(&self) -> StockServiceClient<Channel> {
        StockServiceClient::new(self.channel().await)
    }

    pub async fn shipping(&self) -> ShippingServiceClient<Channel> {
        ShippingServiceClient::new(self.channel().await)
    }

    pub async fn payment(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(self.channel().await)
    }

    /// The metrics page.
    pub async fn scrape(&self) -> String {
        scrape(self.metrics_addr).await
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stops the server but keeps its store, to inspect it afterwards.
    pub async fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stopped cleanly");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A `/metrics` page, fetched over plain HTTP/1.0.
pub async fn scrape(metrics_addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(metrics_addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

fn shutdown_pair() -> (
    oneshot::Sender<()>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

/// In-process services get the spans a process gets when nothing exports
/// (`svc_kit::telemetry` installs the same layer and propagator, in `run`,
/// which in-process services skip): W3C IDs passed on in calls. Without it a
/// test of an order's trace compared two empty strings. No log lines.
pub fn spans_with_trace_ids() {
    use tracing_subscriber::{filter::LevelFilter, prelude::*};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let _ = tracing_subscriber::registry()
            .with(trace_ids::TraceIdsLayer.with_filter(LevelFilter::INFO))
            .try_init();
    });
}

macro_rules! start {
    ($db:expr, $build:expr) => {{
        spans_with_trace_ids();
        let db = $db;
        let app = $build.await.expect("service builds");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let (stop, shutdown) = shutdown_pair();
        let task = tokio::spawn(app.run_until_stopped(shutdown));
        Running {
            addr,
            metrics_addr,
            db,
            stop: Some(stop),
            task: Some(task),
        }
    }};
}

pub async fn stock(backend: Backend) -> Running {
    stock_with_faults(backend, FaultSettings::default()).await
}

pub async fn stock_with_faults(backend: Backend, faults: FaultSettings) -> Running {
    let db = TestDb::new(backend).await;
    let mut settings = stock_svc::Settings::local(db.url.clone(), API_KEY);
    settings.server.admin_api_key = Some(ADMIN_KEY.into());
    // The tests inject faults on purpose: they opt in.
    settings.server.allow_unsafe_settings = faults.is_active();
    settings.server.faults = faults;
    start!(db, stock_svc::build(settings))
}

/// Stock with the given key sets (comma-separated) instead of the tests' keys.
pub async fn stock_with_keys(backend: Backend, business: &str, admin: Option<&str>) -> Running {
    let db = TestDb::new(backend).await;
    let mut settings = stock_svc::Settings::local(db.url.clone(), business);
    settings.server.admin_api_key = admin.map(Into::into);
    start!(db, stock_svc::build(settings))
}

/// The three services with their server settings changed by `configure`
/// (e.g. TLS), each on a fresh store, with the tests' keys. Not seeded.
pub async fn stock_configured(
    backend: Backend,
    configure: impl FnOnce(&mut svc_kit::settings::ServerArgs),
) -> Running {
    let db = TestDb::new(backend).await;
    let mut settings = stock_svc::Settings::local(db.url.clone(), API_KEY);
    settings.server.admin_api_key = Some(ADMIN_KEY.into());
    configure(&mut settings.server);
    start!(db, stock_svc::build(settings))
}

pub async fn shipping_configured(
    backend: Backend,
    configure: impl FnOnce(&mut svc_kit::settings::ServerArgs),
) -> Running {
    let db = TestDb::new(backend).await;
    let mut settings = shipping_svc::Settings::local(db.url.clone(), API_KEY);
    settings.server.admin_api_key = Some(ADMIN_KEY.into());
    configure(&mut settings.server);
    start!(db, shipping_svc::build(settings))
}

pub async fn payment_configured(
    backend: Backend,
    configure: impl FnOnce(&mut svc_kit::settings::ServerArgs),
) -> Running {
    let db = TestDb::new(backend).await;
    let mut settings = payment_svc::Settings::local(db.url.clone(), API_KEY);
    settings.server.admin_api_key = Some(ADMIN_KEY.into());
    configure(&mut settings.server);
    start!(db, payment_svc::build(settings))
}

pub async fn shipping(backend: Backend) -> Running {
    shipping_with_faults(backend, FaultSettings::default()).await
}

pub async fn shipping_with_faults(backend: Backend, faults: FaultSettings) -> Running {
    let db = TestDb::new(backend).await;
    let mut settings = shipping_svc::Settings::local(db.url.clone(), API_KEY);
    settings.server.admin_api_key = Some(ADMIN_KEY.into());
    // The tests inject faults on purpose: they opt in.
    settings.server.allow_unsafe_settings = faults.is_active();
    settings.server.faults = faults;
    start!(db, shipping_svc::build(settings))
}

pub async fn payment(backend: Backend) -> Running {
    payment_with_faults(backend, FaultSettings::default()).await
}

pub async fn payment_with_faults(backend: Backend, faults: FaultSettings) -> Running {
    let db = TestDb::new(backend).await;
    let mut settings = payment_svc::Settings::local(db.url.clone(), API_KEY);
    settings.server.admin_api_key = Some(ADMIN_KEY.into());
    // The tests inject faults on purpose: they opt in.
    settings.server.allow_unsafe_settings = faults.is_active();
    settings.server.faults = faults;
    start!(db, payment_svc::build(settings))
}

/// The orchestrator, in-process, on a fresh store, driving the given services.
pub async fn orchestrator(
    backend: Backend,
    settings: impl FnOnce(String) -> orchestrator::Settings,
) -> Running {
    let db = TestDb::new(backend).await;
    let settings = settings(db.url.clone());
    start!(db, orchestrator::build(settings))
}
