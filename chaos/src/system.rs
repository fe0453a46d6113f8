//! The system under test: four service processes on their own stores, a
//! faulty proxy on each link from the orchestrator (to the three services and
//! to RabbitMQ), and, on PostgreSQL, a server of the run's own. On PostgreSQL
//! the orchestrator may run as several replicas; a kill of the orchestrator
//! then strikes one replica, each in turn.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::ValueEnum;
use svc_kit::durability::Durability;
use tokio::sync::Mutex;

use crate::{
    audit::Stores,
    postgres::Postgres,
    processes::{Binaries, ServiceProcess, free_port},
    proxy::FaultyProxy,
    schedule::{Link, Victim},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        })
    }
}

/// The business key of the run's services (32 characters or more, as a
/// service started from the environment requires).
pub const API_KEY: &str = "chaos-business-key-0123456789abcdef";
/// The admin key, for seeding stock and money.
pub const ADMIN_KEY: &str = "chaos-admin-key-0123456789abcdef0123";

pub struct SystemConfig {
    pub store: StoreKind,
    pub binaries: Binaries,
    /// The services fail 20 % of calls before the work and lose 20 % of
    /// replies after it.
    pub builtin_faults: bool,
    /// The real broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp_url: String,
    pub pg_bin_dir: Option<PathBuf>,
    /// Where stores and logs go.
    pub dir: PathBuf,
    /// Orchestrator replicas (more than one needs PostgreSQL).
    pub replicas: usize,
    /// What every process's commits wait for.
    pub durability: Durability,
}

/// The `DURABILITY` value the processes read.
fn durability_name(durability: Durability) -> String {
    durability
        .to_possible_value()
        .expect("every durability has a name")
        .get_name()
        .to_owned()
}

/// The replicas' lease in a run: short, so that a killed replica's sagas
/// are taken over within the run's fault windows.
pub const REPLICA_LEASE_MS: u64 = 1_000;

pub struct System {
    pub store: StoreKind,
    pub dir: PathBuf,
    pub stores: Stores,
    pub exchange: String,
    pub amqp_url: String,
    pub postgres: Mutex<Option<Postgres>>,
    /// The domain services.
    pub processes: BTreeMap<Victim, Mutex<ServiceProcess>>,
    /// The orchestrator's replicas (one unless asked for more).
    pub orchestrators: Vec<Mutex<ServiceProcess>>,
    /// Orchestrator kills so far: the next strikes replica `kills % n`.
    orchestrator_kills: AtomicUsize,
    pub links: BTreeMap<Link, FaultyProxy>,
    pub broker: FaultyProxy,
    /// The services' own addresses, not through a proxy.
    pub direct: BTreeMap<Victim, String>,
}

impl System {
    pub async fn start(config: SystemConfig) -> anyhow::Result<System> {
        config.binaries.check()?;
        if config.replicas > 1 && config.store != StoreKind::Postgres {
            bail!(
                "{} orchestrator replicas need PostgreSQL: a SQLite file serves one orchestrator",
                config.replicas
            );
        }
        let dir = config.dir.clone();
        let postgres = match config.store {
            StoreKind::Sqlite => None,
            StoreKind::Postgres => Some(Postgres::create(&dir, config.pg_bin_dir.clone()).await?),
        };
        let store_url = async |name: &str| -> anyhow::Result<String> {
            Ok(match &postgres {
                Some(pg) => pg.create_database(name).await?,
                None => format!("sqlite://{}", dir.join(format!("{name}.db")).display()),
            })
        };
        let stores = Stores {
            orchestrator: store_url("orchestrator").await?,
            stock: store_url("stock").await?,
            shipping: store_url("shipping").await?,
            payment: store_url("payment").await?,
        };

        let mut processes = BTreeMap::new();
        let mut direct = BTreeMap::new();
        let mut links = BTreeMap::new();
        for (victim, link, binary, url) in [
            (
                Victim::Stock,
                Link::Stock,
                &config.binaries.stock,
                &stores.stock,
            ),
            (
                Victim::Shipping,
                Link::Shipping,
                &config.binaries.shipping,
                &stores.shipping,
            ),
            (
                Victim::Payment,
                Link::Payment,
                &config.binaries.payment,
                &stores.payment,
            ),
        ] {
            let mut env = vec![
                ("DATABASE_URL".to_owned(), url.clone()),
                ("APPLICATION_API_KEY".to_owned(), API_KEY.to_owned()),
                ("ADMIN_API_KEY".to_owned(), ADMIN_KEY.to_owned()),
                ("DURABILITY".to_owned(), durability_name(config.durability)),
            ];
            if config.builtin_faults {
                env.push(("ALLOW_UNSAFE_SETTINGS".into(), "true".into()));
                env.push(("FAULT_UNAVAILABLE_RATE".into(), "0.2".into()));
                env.push(("FAULT_DROP_REPLY_RATE".into(), "0.2".into()));
            }
            let mut process = ServiceProcess::new(victim.name(), binary, free_port()?, env, &dir);
            process.start()?;
            process.wait_ready(Duration::from_secs(30)).await?;
            links.insert(link, FaultyProxy::start(process.addr()).await?);
            direct.insert(victim, process.url());
            processes.insert(victim, Mutex::new(process));
        }

        let broker = FaultyProxy::start(broker_addr(&config.amqp_url)?).await?;
        let exchange = format!("chaos.orders.{}", uuid::Uuid::new_v4().simple());
        let via = |link: Link| format!("http://{}", links[&link].addr);
        let env = vec![
            ("DATABASE_URL".to_owned(), stores.orchestrator.clone()),
            ("APPLICATION_API_KEY".to_owned(), API_KEY.to_owned()),
            ("STOCK_SERVICE_URL".to_owned(), via(Link::Stock)),
            ("SHIPPING_SERVICE_URL".to_owned(), via(Link::Shipping)),
            ("PAYMENT_SERVICE_URL".to_owned(), via(Link::Payment)),
            (
                "RABBITMQ_URL".to_owned(),
                with_addr(&config.amqp_url, broker.addr)?,
            ),
            ("EVENTS_EXCHANGE".to_owned(), exchange.clone()),
            ("DURABILITY".to_owned(), durability_name(config.durability)),
        ];
        let mut orchestrators = vec![];
        for i in 0..config.replicas.max(1) {
            let mut env = env.clone();
            let name = if config.replicas > 1 {
                env.push(("REPLICA_ID".to_owned(), format!("r{i}")));
                env.push(("LEASE_MS".to_owned(), REPLICA_LEASE_MS.to_string()));
                format!("{}-r{i}", Victim::Orchestrator.name())
            } else {
                Victim::Orchestrator.name().to_owned()
            };
            let mut orchestrator = ServiceProcess::new(
                &name,
                &config.binaries.orchestrator,
                free_port()?,
                env,
                &dir,
            );
            orchestrator.start()?;
            orchestrator.wait_ready(Duration::from_secs(30)).await?;
            if i == 0 {
                direct.insert(Victim::Orchestrator, orchestrator.url());
            }
            orchestrators.push(Mutex::new(orchestrator));
        }

        Ok(System {
            store: config.store,
            dir,
            stores,
            exchange,
            amqp_url: config.amqp_url,
            postgres: Mutex::new(postgres),
            processes,
            orchestrators,
            orchestrator_kills: AtomicUsize::new(0),
            links,
            broker,
            direct,
        })
    }

    pub fn url(&self, victim: Victim) -> &str {
        &self.direct[&victim]
    }

    /// Every orchestrator replica's URL.
    pub async fn orchestrator_urls(&self) -> Vec<String> {
        let mut urls = vec![];
        for replica in &self.orchestrators {
            urls.push(replica.lock().await.url());
        }
        urls
    }

    /// The process a kill of `victim` strikes: for the orchestrator, its
    /// replicas in turn.
    fn process(&self, victim: Victim) -> &Mutex<ServiceProcess> {
        match victim {
            Victim::Orchestrator => {
                let kills = self.orchestrator_kills.fetch_add(1, Ordering::Relaxed);
                &self.orchestrators[kills % self.orchestrators.len()]
            }
            other => &self.processes[&other],
        }
    }

    fn every_process(&self) -> impl DoubleEndedIterator<Item = &Mutex<ServiceProcess>> {
        self.processes.values().chain(&self.orchestrators)
    }

    /// SIGKILL, then a restart right after. Returns once the victim takes
    /// connections again.
    pub async fn kill_and_restart(&self, victim: Victim) -> anyhow::Result<()> {
        if victim == Victim::Postgres {
            let mut postgres = self.postgres.lock().await;
            let Some(pg) = postgres.as_mut() else {
                bail!("this run has no PostgreSQL to kill");
            };
            pg.kill9().await?;
            return pg.start().await.context("PostgreSQL did not come back");
        }
        let mut process = self.process(victim).lock().await;
        process.kill9().await?;
        process.start()?;
        process.wait_ready(Duration::from_secs(30)).await
    }

    /// Heals every link, and checks that no process died on its own.
    /// Returns what it found dead (and restarted).
    pub async fn heal(&self) -> anyhow::Result<Vec<String>> {
        for proxy in self.links.values().chain([&self.broker]) {
            proxy.heal();
        }
        let mut dead = vec![];
        for process in self.every_process() {
            let mut process = process.lock().await;
            if let Some(exit) = process.exited() {
                dead.push(format!("{exit}; see {}", process.log().display()));
                process.start()?;
            }
            process.wait_ready(Duration::from_secs(30)).await?;
        }
        Ok(dead)
    }

    pub async fn stop(&self) {
        for process in self.every_process().rev() {
            process.lock().await.stop(Duration::from_secs(5)).await;
        }
        if let Some(pg) = self.postgres.lock().await.as_mut() {
            pg.stop().await;
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `host:port` of an AMQP URL.
fn broker_addr(amqp_url: &str) -> anyhow::Result<SocketAddr> {
    let authority = authority(amqp_url)?;
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port)?
        .next()
        .with_context(|| format!("{host_port} resolves to no address"))
}

/// The same URL, pointed at `addr`.
fn with_addr(amqp_url: &str, addr: SocketAddr) -> anyhow::Result<String> {
    let authority = authority(amqp_url)?;
    let replaced = match authority.rsplit_once('@') {
        Some((credentials, _)) => format!("{credentials}@{addr}"),
        None => addr.to_string(),
    };
    Ok(amqp_url.replacen(authority, &replaced, 1))
}

fn authority(amqp_url: &str) -> anyhow::Result<&str> {
    let rest = amqp_url
        .strip_prefix("amqp://")
        .with_context(|| format!("{amqp_url:?} is not an amqp:// URL"))?;
    Ok(rest.split('/').next().unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_url_is_pointed_at_the_proxy() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        assert_eq!(broker_addr(url).unwrap().port(), 5672);
        let proxy: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            with_addr(url, proxy).unwrap(),
            "amqp://guest:guest@127.0.0.1:4000/%2f"
        );
        assert!(broker_addr("http://x").is_err());
    }
}
