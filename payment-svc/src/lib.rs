//! The payment service: customer accounts with balances, and the charges and
//! refunds of orders. A charge never drives a balance below zero.
//!
//! - [`api`]: the gRPC handlers: validate, then run each mutation once per `request_id`.
//! - [`charges`]: charging and refunding an order (the saga step and its compensation).
//! - [`combined`]: on PostgreSQL, a batch's charges in one statement.
//! - [`accounts`]: account lookup and deposits.
//! - [`error`]: the business outcomes and their gRPC codes.

pub mod accounts;
pub mod api;
pub mod charges;
pub mod combined;
pub mod error;

use clap::Parser;
use ordersaga_proto::payment::v1::payment_service_server::PaymentServiceServer;
use svc_kit::{
    auth::RequireKey,
    server::{App, Defaults},
    settings::ServerArgs,
    store::Migrations,
};

pub const DEFAULTS: Defaults = Defaults {
    port: 50054,
    metrics_port: 9094,
    database_url: "sqlite://data/payment.db",
};

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

pub type Application = App<RequireKey<PaymentServiceServer<api::PaymentApi>>>;

/// Opens the store, runs migrations and binds the ports.
pub async fn build(settings: Settings) -> anyhow::Result<Application> {
    svc_kit::server::start_domain_service(settings.server, &DEFAULTS, &MIGRATIONS, |store| {
        PaymentServiceServer::new(api::PaymentApi::new(store))
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
    svc_kit::server::run_until_signal("payment-svc", log_json, build(settings)).await
}
