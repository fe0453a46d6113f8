//! The shipping service: prepares shipments for orders, to the countries it
//! serves, and cancels them.
//!
//! - [`api`]: the gRPC handlers: validate, then run each mutation once per `request_id`.
//! - [`combined`]: on PostgreSQL, a batch's prepares in one statement.
//! - [`shipments`]: preparing and cancelling a shipment (the saga step and its compensation).
//! - [`error`]: the business outcomes and their gRPC codes.

pub mod api;
pub mod combined;
pub mod error;
pub mod shipments;

use std::collections::BTreeSet;

use clap::Parser;
use ordersaga_proto::shipping::v1::shipping_service_server::ShippingServiceServer;
use svc_kit::{
    auth::RequireKey,
    server::{App, Defaults},
    settings::ServerArgs,
    store::Migrations,
};

pub const DEFAULTS: Defaults = Defaults {
    port: 50053,
    metrics_port: 9093,
    database_url: "sqlite://data/shipping.db",
};
pub const DEFAULT_COUNTRIES: &str = "AT,BE,CA,CH,DE,DK,ES,FI,FR,GB,IE,IT,NL,NO,PL,PT,SE,US";

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

/// The shipping service's settings, from flags and env.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "shipping-svc",
    version,
    about = "The shipping service of the order saga system"
)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerArgs,

    /// Countries shipped to: ISO 3166-1 alpha-2 codes, comma-separated.
    #[arg(long, env = "SHIP_TO_COUNTRIES", value_name = "SHIP_TO_COUNTRIES", value_delimiter = ',', default_value = DEFAULT_COUNTRIES, value_parser = parse_country)]
    pub ship_to_countries: Vec<String>,
}

impl Settings {
    /// Settings for tests and embedded runs (see [`ServerArgs::local`]).
    pub fn local(database_url: impl Into<String>, api_key: &str) -> Self {
        Settings {
            server: ServerArgs::local(database_url, api_key),
            ship_to_countries: DEFAULT_COUNTRIES.split(',').map(str::to_owned).collect(),
        }
    }
}

fn parse_country(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.len() == 2 && value.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not an ISO 3166-1 alpha-2 code such as \"DE\""
        ))
    }
}

pub type Application = App<RequireKey<ShippingServiceServer<api::ShippingApi>>>;

/// Opens the store, runs migrations and binds the port.
pub async fn build(settings: Settings) -> anyhow::Result<Application> {
    let countries: BTreeSet<String> = settings.ship_to_countries.iter().cloned().collect();
    svc_kit::server::start_domain_service(settings.server, &DEFAULTS, &MIGRATIONS, |store| {
        ShippingServiceServer::new(api::ShippingApi::new(store, countries))
            .max_decoding_message_size(svc_kit::server::MAX_REQUEST_BYTES)
    })
    .await
}

/// The binary's whole life: logs, build, serve until SIGTERM or SIGINT, drain.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let log_json = settings.server.log_json;
    svc_kit::server::run_until_signal("shipping-svc", log_json, build(settings)).await
}
