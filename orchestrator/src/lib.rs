//! The orchestrator: serves `orders.v1.OrderService` and drives one saga per
//! order through the domain services.
//!
//! - [`order_saga`]: the order saga, defined on the generic `saga-engine`: reserve stock, prepare
//!   shipment, charge payment, and their compensations.
//! - [`orders`]: the public API: create, get, list, watch, cancel.
//! - [`outbox`]: order events, written with the state change, relayed to RabbitMQ.
//! - [`downstream`]: the clients of the domain services.
//! - [`replica`]: how this process shares its store with other orchestrators.
//! - [`explorer`]: the saga explorer, a web page to see sagas and act on them.
//! - [`error`]: the OrderService's outcomes and their gRPC codes.

pub mod downstream;
pub mod error;
pub mod explorer;
pub mod order_saga;
pub mod orders;
pub mod outbox;
pub mod replica;

/// Named crash points, armed only by the test build of the binary.
pub use saga_engine::crash_points;

use std::{sync::Arc, time::Duration};

use clap::{Args, Parser};
use ordersaga_proto::orders::v1::order_service_server::OrderServiceServer;
use saga_engine::{Engine, Ownership, RetryPolicy, metrics::EngineMetrics};
use svc_kit::{
    auth::RequireKey,
    durability::Durability,
    metrics::MetricsRegistry,
    server::App,
    settings::ServerArgs,
    store::{Migrations, Store},
};

use crate::{
    downstream::{Downstream, DownstreamArgs},
    explorer::{BoundExplorer, ExplorerArgs},
    order_saga::OrderData,
    orders::{
        OrderApi,
        pricing::Catalogue,
        watch_limits::{WatchArgs, WatchLimits},
    },
    outbox::{
        leader::RelayLeader,
        relay::{BrokerArgs, OutboxMetrics, Relay},
    },
    replica::{ReplicaArgs, SqliteLock},
};

pub const DEFAULT_PORT: u16 = 50051;
pub const DEFAULT_METRICS_PORT: u16 = 9091;
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/orchestrator.db";

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE_MIGRATIONS,
    postgres: &POSTGRES_MIGRATIONS,
};

/// The orchestrator's settings, from flags and env.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "The saga orchestrator of the order system"
)]
pub struct Settings {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    #[command(flatten)]
    pub replica: ReplicaArgs,

    #[command(flatten)]
    pub watch: WatchArgs,

    #[command(flatten)]
    pub downstream: DownstreamArgs,

    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub explorer: ExplorerArgs,
}

/// How sagas are driven.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Attempts per forward step before its outcome counts as unknown (and is compensated).
    /// With the default backoff, the budget spans about 15 s, so a short outage of a
    /// service does not turn every saga in flight into a compensation.
    #[arg(long, env = "STEP_MAX_ATTEMPTS", value_name = "STEP_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub step_max_attempts: u32,

    /// Deadline of each step call, in milliseconds.
    #[arg(long, env = "STEP_TIMEOUT_MS", value_name = "STEP_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub step_timeout_ms: u64,

    /// First backoff between attempts, in milliseconds; it doubles, with jitter.
    #[arg(long, env = "RETRY_INITIAL_BACKOFF_MS", value_name = "RETRY_INITIAL_BACKOFF_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub retry_initial_backoff_ms: u64,

    /// Longest backoff between forward attempts, in milliseconds.
    #[arg(long, env = "RETRY_MAX_BACKOFF_MS", value_name = "RETRY_MAX_BACKOFF_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub retry_max_backoff_ms: u64,

    /// Longest backoff between compensation attempts (which never give up), in milliseconds.
    #[arg(long, env = "COMPENSATION_MAX_BACKOFF_MS", value_name = "COMPENSATION_MAX_BACKOFF_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub compensation_max_backoff_ms: u64,

    /// Most sagas driven at once; more wait their turn.
    #[arg(long, env = "MAX_INFLIGHT_SAGAS", value_name = "MAX_INFLIGHT_SAGAS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_inflight_sagas: u32,

    /// Most new orders waiting for a saga slot (past MAX_INFLIGHT_SAGAS);
    /// past it CreateOrder is answered RESOURCE_EXHAUSTED before anything is
    /// recorded. Sagas resumed after a restart count too.
    #[arg(long, env = "MAX_WAITING_SAGAS", value_name = "MAX_WAITING_SAGAS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub max_waiting_sagas: u32,

    /// A compensation failing for longer than this many seconds is announced (order.compensation_stuck).
    #[arg(
        long,
        env = "COMPENSATION_STUCK_AFTER_SECS",
        value_name = "COMPENSATION_STUCK_AFTER_SECS",
        default_value_t = 60
    )]
    pub compensation_stuck_after_secs: u64,

    /// A compensation failing for longer than this many seconds gives up:
    /// the order ends NEEDS_ATTENTION (order.needs_attention) for a person to
    /// resolve. 0 retries forever. Counted from the first failed attempt
    /// since the saga was last resumed.
    #[arg(
        long,
        env = "COMPENSATION_ATTENTION_AFTER_SECS",
        value_name = "COMPENSATION_ATTENTION_AFTER_SECS",
        default_value_t = 6 * 3600
    )]
    pub compensation_attention_after_secs: u64,

    /// BENCHMARKS ONLY: keep the saga log in memory (lost on restart), to measure
    /// the cost of durability. Never use it for real orders.
    #[arg(long, env = "BENCH_ONLY_IN_MEMORY_STORE", default_value_t = false)]
    pub bench_only_in_memory_store: bool,

    /// On shutdown, how long in-flight steps may take to finish before they are left to recovery, in milliseconds.
    #[arg(
        long,
        env = "SHUTDOWN_GRACE_MS",
        value_name = "SHUTDOWN_GRACE_MS",
        default_value_t = 5_000
    )]
    pub shutdown_grace_ms: u64,
}

impl Default for EngineArgs {
    fn default() -> Self {
        EngineArgs {
            step_max_attempts: 10,
            step_timeout_ms: 5_000,
            retry_initial_backoff_ms: 50,
            retry_max_backoff_ms: 5_000,
            compensation_max_backoff_ms: 10_000,
            max_inflight_sagas: 10_000,
            max_waiting_sagas: 10_000,
            compensation_stuck_after_secs: 60,
            compensation_attention_after_secs: 6 * 3600,
            bench_only_in_memory_store: false,
            shutdown_grace_ms: 5_000,
        }
    }
}

impl EngineArgs {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.step_max_attempts,
            call_timeout: Duration::from_millis(self.step_timeout_ms),
            initial_backoff: Duration::from_millis(self.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(self.retry_max_backoff_ms),
            max_compensation_backoff: Duration::from_millis(self.compensation_max_backoff_ms),
            compensation_stuck_after: Duration::from_secs(self.compensation_stuck_after_secs),
            compensation_attention_after: (self.compensation_attention_after_secs > 0)
                .then(|| Duration::from_secs(self.compensation_attention_after_secs)),
        }
    }
}

impl Settings {
    /// Settings for tests and embedded runs: the given store, key and services.
    pub fn local(
        database_url: impl Into<String>,
        api_key: &str,
        downstream: DownstreamArgs,
    ) -> Self {
        Settings {
            server: ServerArgs::local(database_url, api_key),
            engine: EngineArgs::default(),
            replica: ReplicaArgs::default(),
            watch: WatchArgs::default(),
            downstream,
            broker: BrokerArgs::default(),
            explorer: ExplorerArgs::default(),
        }
    }
}

type Server = App<RequireKey<OrderServiceServer<OrderApi>>>;

/// A built orchestrator: the store is migrated, open sagas are resumed, and the
/// port is bound.
pub struct Orchestrator {
    server: Server,
    engine: Engine<OrderData>,
    relay: Relay,
    grace: Duration,
    resumed: usize,
    explorer: Option<BoundExplorer>,
    /// On a SQLite file: held for the process's life.
    _sqlite_lock: Option<SqliteLock>,
}

/// The service setting, as the saga engine (a crate of its own) names it.
fn engine_durability(durability: Durability) -> saga_engine::log::Durability {
    match durability {
        Durability::Full => saga_engine::log::Durability::Full,
        Durability::Relaxed => saga_engine::log::Durability::Relaxed,
    }
}

pub async fn build(settings: Settings) -> anyhow::Result<Orchestrator> {
    let url = settings
        .server
        .database_url
        .clone()
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
    let in_memory: &[&str] = if settings.engine.bench_only_in_memory_store {
        &[
            "the benchmark-only in-memory saga log (BENCH_ONLY_IN_MEMORY_STORE), which loses every open saga on restart",
        ]
    } else {
        &[]
    };
    settings.server.check_unsafe(in_memory)?;
    settings.server.durability.announce();
    let keys = settings.server.keys()?;
    settings.server.tls.server_config()?;
    let store = if settings.engine.bench_only_in_memory_store {
        Store::open_in_memory_for_benchmarks(&MIGRATIONS).await?
    } else {
        Store::open(&url, &MIGRATIONS, settings.server.durability).await?
    };
    // A second orchestrator on one SQLite file would drive the same sagas.
    let sqlite_lock = saga_engine::log::sqlite_file(&store.pool)
        .map(|file| SqliteLock::acquire(&file))
        .transpose()?;
    let ownership = if settings.engine.bench_only_in_memory_store {
        Ownership::Alone
    } else {
        settings.replica.ownership(&url)
    };
    let mut metrics = MetricsRegistry::default();
    metrics.register_pool(store.pool.clone());
    let engine_metrics = EngineMetrics::register(&mut metrics.registry);
    let outbox_metrics = OutboxMetrics::register(&mut metrics.registry);
    let downstream = Downstream::connect_lazy(&settings.downstream, settings.server.api_key())?;
    let catalogue = Arc::new(Catalogue::new(
        downstream.stock.client.clone(),
        settings.downstream.pricing_lookups(),
    ));
    let leader = match &ownership {
        Ownership::Replica(replica) => RelayLeader::elected(&url, &replica.id, replica.lease),
        Ownership::Alone => RelayLeader::alone(),
    };
    let engine = Engine::with_ownership(
        order_saga::definition(downstream, catalogue.clone()),
        store.pool,
        settings.engine.retry_policy(),
        settings.engine.max_inflight_sagas as usize,
        engine_metrics,
        ownership,
        engine_durability(settings.server.durability),
    )?;
    let relay = Relay::new(
        engine.pool().clone(),
        engine.log_writer(),
        &settings.broker,
        outbox_metrics,
        leader,
    )?;
    let resumed = engine.recover().await?;
    if resumed > 0 {
        tracing::info!(resumed, "resuming open sagas from the log");
    }
    let api = Arc::new(OrderApi::new(
        engine.clone(),
        catalogue,
        settings.server.request_timeout(),
        WatchLimits::new(&settings.watch),
        settings.engine.max_waiting_sagas as usize,
        &mut metrics.registry,
    ));
    let explorer = match settings.explorer.explorer_port {
        Some(port) => Some(
            BoundExplorer::bind(
                settings.server.host,
                port,
                api.clone(),
                engine.clone(),
                keys.clone(),
                settings.explorer.jaeger_ui_url.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let service = RequireKey::new(
        OrderServiceServer::from_arc(api)
            .max_decoding_message_size(svc_kit::server::MAX_REQUEST_BYTES),
        keys,
    );
    let grace = Duration::from_millis(settings.engine.shutdown_grace_ms);
    let server = App::bind(
        settings.server,
        DEFAULT_PORT,
        DEFAULT_METRICS_PORT,
        service,
        metrics,
    )
    .await?;
    Ok(Orchestrator {
        server,
        engine,
        relay,
        grace,
        resumed,
        explorer,
        _sqlite_lock: sqlite_lock,
    })
}

impl Orchestrator {
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.server.metrics_addr()
    }

    /// Where the saga explorer listens, when EXPLORER_PORT is set.
    pub fn explorer_addr(&self) -> Option<std::net::SocketAddr> {
        self.explorer.as_ref().map(BoundExplorer::local_addr)
    }

    /// How many open sagas were resumed from the log at start-up.
    pub fn resumed(&self) -> usize {
        self.resumed
    }

    /// Serves until `shutdown`; then stops taking orders, drains calls, and gives
    /// in-flight steps a grace period before leaving them to recovery.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_relay, relay_stopping) = tokio::sync::watch::channel(false);
        let relay = self.relay.spawn(relay_stopping);
        let (stop_explorer, explorer_stopping) = tokio::sync::watch::channel(false);
        let explorer = self.explorer.map(|explorer| {
            let mut stopping = explorer_stopping;
            tokio::spawn(explorer.serve(async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            }))
        });
        // An engine that lost its footing (a replica whose ID another process
        // took; relaxed commits on a PostgreSQL server that recovered from a
        // crash) stops serving, as on SIGTERM, and the process exits with the
        // reason.
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
        let lost_seen = Arc::new(tokio::sync::Notify::new());
        let engine = self.engine.clone();
        let seen = lost_seen.clone();
        let stop = async move {
            tokio::select! {
                () = shutdown => {}
                reason = engine.lost() => {
                    seen.notify_one();
                    let _ = lost_tx.send(reason);
                }
            }
        };
        // A lost engine must not keep the process up for as long as its open
        // streams last (a WatchOrder may, for an hour): past the grace period
        // and a little more, what is left of the drain is dropped.
        let drain_limit = self.grace + LOST_DRAIN_LIMIT;
        let serving = self.server.run_until_stopped(stop);
        tokio::pin!(serving);
        let result = tokio::select! {
            result = &mut serving => result,
            () = async {
                lost_seen.notified().await;
                tokio::time::sleep(drain_limit).await;
            } => {
                tracing::warn!(?drain_limit, "the drain after the engine was lost took too long; dropping it");
                Ok(())
            }
        };
        // The explorer goes with the API. Its live views would hold a
        // graceful stop open until their lifetime: they get a second.
        stop_explorer.send_replace(true);
        if let Some(mut explorer) = explorer
            && tokio::time::timeout(Duration::from_secs(1), &mut explorer)
                .await
                .is_err()
        {
            explorer.abort();
        }
        self.engine.shutdown(self.grace).await;
        // Unsent events stay in the outbox for the next start.
        stop_relay.send_replace(true);
        let _ = relay.await;
        if let Ok(reason) = lost_rx.await {
            anyhow::bail!(reason);
        }
        result
    }
}

/// How long past its grace period a lost engine's drain may take.
const LOST_DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// The binary's whole life: logs, build (and resume open sagas), serve until
/// SIGTERM or SIGINT, drain.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let _telemetry = svc_kit::telemetry::init("orchestrator", settings.server.log_json)?;
    let orchestrator = build(settings).await?;
    orchestrator
        .run_until_stopped(svc_kit::shutdown::signal())
        .await
}
