//! The payment service: customer accounts with balances, and the charges and
//! refunds of orders. A charge never drives a balance below zero.
//!
//! - [`api`]: the gRPC handlers: validate, then run each mutation once per `request_id`.
//! - [`charges`]: charging and refunding an order (the saga step and its compensation).
//! - [`accounts`]: account lookup and deposits.
//! - [`error`]: the business outcomes and their gRPC codes.

pub mod accounts;
pub mod api;
pub mod charges;
pub mod error;

use clap::Parser;
use ordersaga_proto::payment::v1::payment_service_server::PaymentServiceServer;
use svc_kit::{
    auth::ApiKeyCheck,
    metrics::MetricsRegistry,
    server::App,
    settings::ServerArgs,
    store::{Migrations, Store},
};
use tonic::service::interceptor::InterceptedService;

pub const DEFAULT_METRICS_PORT: u16 = 9094;
pub const DEFAULT_PORT: u16 = 50054;
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/payment.db";

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

/// The payment service's settings, from flags and env.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "payment-svc",
    version,
    about = "The payment service of the order saga system"
)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerArgs,
}

pub type Application = App<InterceptedService<PaymentServiceServer<api::PaymentApi>, ApiKeyCheck>>;

/// Opens the store, runs migrations and binds the port.
pub async fn build(settings: Settings) -> anyhow::Result<Application> {
    let url = settings
        .server
        .database_url
        .clone()
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let store = Store::open(&url, &MIGRATIONS).await?;
    let store_pool = store.pool.clone();
    let api = api::PaymentApi::new(store);
    let service =
        PaymentServiceServer::with_interceptor(api, ApiKeyCheck::new(settings.server.api_key()));
    let mut metrics = MetricsRegistry::default();
    metrics.register_pool(store_pool);
    App::bind(
        settings.server,
        DEFAULT_PORT,
        DEFAULT_METRICS_PORT,
        service,
        metrics,
    )
    .await
}

impl Settings {
    /// Settings for tests and embedded runs (see [`ServerArgs::local`]).
    pub fn local(database_url: impl Into<String>, api_key: &str) -> Self {
        Settings {
            server: ServerArgs::local(database_url, api_key),
        }
    }
}

/// The binary's whole life: logs, build, serve until SIGTERM or SIGINT, drain.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let _telemetry = svc_kit::telemetry::init("payment-svc", settings.server.log_json);
    let app = build(settings).await?;
    app.run_until_stopped(svc_kit::shutdown::signal()).await
}
