//! The stock service: a product catalogue, and stock reservations that cover all
//! of an order's lines or none of them.
//!
//! - [`api`]: the gRPC handlers: validate, then run each mutation once per `request_id`.
//! - [`reservations`]: reserving and releasing an order's stock (the saga step and its compensation).
//! - [`combined`]: on PostgreSQL, a batch's one-line reservations in one statement.
//! - [`catalogue`]: products: lookup, listing, restocking.
//! - [`error`]: the business outcomes and their gRPC codes.

pub mod api;
pub mod catalogue;
pub mod combined;
pub mod error;
pub mod reservations;

use clap::Parser;
use ordersaga_proto::stock::v1::stock_service_server::StockServiceServer;
use svc_kit::{
    auth::RequireKey,
    server::{App, Defaults},
    settings::ServerArgs,
    store::Migrations,
};

pub const DEFAULTS: Defaults = Defaults {
    port: 50052,
    metrics_port: 9092,
    database_url: "sqlite://data/stock.db",
};

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

pub type Application = App<RequireKey<StockServiceServer<api::StockApi>>>;

/// Opens the store, runs migrations and binds the ports.
pub async fn build(settings: Settings) -> anyhow::Result<Application> {
    svc_kit::server::start_domain_service(settings.server, &DEFAULTS, &MIGRATIONS, |store| {
        StockServiceServer::new(api::StockApi::new(store))
            .max_decoding_message_size(svc_kit::server::MAX_REQUEST_BYTES)
    })
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
    let log_json = settings.server.log_json;
    svc_kit::server::run_until_signal("stock-svc", log_json, build(settings)).await
}
