//! The stock service: a product catalogue, and stock reservations that cover all
//! of an order's lines or none of them.
//!
//! - [`api`]: the gRPC handlers: validate, then run each mutation once per `request_id`.
//! - [`reservations`]: reserving and releasing an order's stock (the saga step and its compensation).
//! - [`catalogue`]: products: lookup, listing, restocking.
//! - [`error`]: the business outcomes and their gRPC codes.

pub mod api;
pub mod catalogue;
pub mod error;
pub mod reservations;

use clap::Parser;
use ordersaga_proto::stock::v1::stock_service_server::StockServiceServer;
use svc_kit::{
    auth::ApiKeyCheck,
    metrics::MetricsRegistry,
    server::App,
    settings::ServerArgs,
    store::{Migrations, Store},
};
use tonic::service::interceptor::InterceptedService;

pub const DEFAULT_METRICS_PORT: u16 = 9092;
pub const DEFAULT_PORT: u16 = 50052;
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/stock.db";

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

/// The stock service's settings, from flags and env.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "stock-svc",
    version,
    about = "The stock service of the order saga system"
)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerArgs,
}

pub type Application = App<InterceptedService<StockServiceServer<api::StockApi>, ApiKeyCheck>>;

/// Opens the store, runs migrations and binds the port.
pub async fn build(settings: Settings) -> anyhow::Result<Application> {
    let url = settings
        .server
        .database_url
        .clone()
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let store = Store::open(&url, &MIGRATIONS).await?;
    let store_pool = store.pool.clone();
    let api = api::StockApi::new(store);
    let service =
        StockServiceServer::with_interceptor(api, ApiKeyCheck::new(settings.server.api_key()));
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
    let _telemetry = svc_kit::telemetry::init("stock-svc", settings.server.log_json);
    let app = build(settings).await?;
    app.run_until_stopped(svc_kit::shutdown::signal()).await
}
