//! One chaos run: the system up, the world seeded, the load and the
//! schedule's faults at once, everything healed, the events awaited, then
//! the audit.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use svc_kit::durability::Durability;
use tokio::time::Instant;

use crate::{
    audit,
    events::Consumer,
    load::{self, Load},
    plant::Plant,
    processes::Binaries,
    report::{Injected, Report},
    schedule::{Fault, Link, Profile, Schedule},
    system::{ADMIN_KEY, API_KEY, StoreKind, System, SystemConfig},
    world::World,
};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub store: StoreKind,
    pub profile: Profile,
    pub seed: u64,
    pub orders: u64,
    pub concurrency: usize,
    /// The orders are started evenly over this long; by default over the
    /// schedule, so that orders are in flight at every fault.
    pub spread: Option<Duration>,
    pub builtin_faults: bool,
    /// Only the schedule's kills (no network fault, no broker cut).
    pub kills_only: bool,
    /// What the processes' commits wait for. Relaxed promises nothing when
    /// the database server crashes, so PostgreSQL is then never killed.
    pub durability: Durability,
    pub plant: Option<Plant>,
    pub binaries: Binaries,
    pub amqp_url: String,
    pub pg_bin_dir: Option<PathBuf>,
    /// How long to wait for the events of finished orders after the load.
    pub events_timeout: Duration,
    /// Orchestrator replicas (PostgreSQL only); a kill of the orchestrator
    /// strikes one, each in turn.
    pub replicas: usize,
}

pub async fn run(config: &RunConfig) -> anyhow::Result<Report> {
    let schedule = config.schedule();
    let dir = tempfile::Builder::new()
        .prefix(&format!("chaos-{}-", config.store))
        .tempdir()?;
    let system = Arc::new(
        System::start(SystemConfig {
            store: config.store,
            binaries: config.binaries.clone(),
            builtin_faults: config.builtin_faults,
            amqp_url: config.amqp_url.clone(),
            pg_bin_dir: config.pg_bin_dir.clone(),
            dir: dir.path().to_owned(),
            replicas: config.replicas,
            durability: config.durability,
        })
        .await?,
    );
    let result = drive(config, &schedule, &system).await;
    system.stop().await;
    match result {
        Ok(report) if report.audit.passed() => Ok(report),
        Ok(report) => {
            // Keep the logs and stores of a failed run to look at.
            let kept = dir.keep();
            Ok(Report {
                kept: Some(kept),
                ..report
            })
        }
        Err(error) => {
            let kept = dir.keep();
            Err(error.context(format!(
                "the chaos run (seed {}) broke off; logs and stores in {}",
                config.seed,
                kept.display()
            )))
        }
    }
}

impl RunConfig {
    pub fn schedule(&self) -> Schedule {
        let kill_postgres =
            self.store == StoreKind::Postgres && self.durability == Durability::Full;
        let schedule = Schedule::new(self.profile, self.seed, kill_postgres);
        if self.kills_only {
            schedule.kills_only()
        } else {
            schedule
        }
    }
}

async fn drive(
    config: &RunConfig,
    schedule: &Schedule,
    system: &Arc<System>,
) -> anyhow::Result<Report> {
    use crate::schedule::Victim;

    let world = World::new(config.orders);
    world
        .seed(
            system.url(Victim::Stock),
            system.url(Victim::Payment),
            ADMIN_KEY,
        )
        .await?;
    let consumer = Consumer::start(&system.amqp_url, &system.exchange)
        .await
        .context("the events consumer could not connect to RabbitMQ")?;
    let spread = config
        .spread
        .unwrap_or(Duration::from_millis(schedule.end_ms()));
    let load = Load {
        orchestrator_urls: system.orchestrator_urls().await,
        api_key: API_KEY.to_owned(),
        orders: config.orders,
        concurrency: config.concurrency,
        spread,
        give_up_after: Duration::from_secs(180),
    };

    let started = Instant::now();
    let mut injector = tokio::spawn(inject(system.clone(), schedule.clone(), started));
    let orders = load::run(&load, &world);
    tokio::pin!(orders);
    // An injection that fails (PostgreSQL that does not come back) ends the
    // run at once, rather than after every client has given up.
    let (clients, load_ended, injected) = tokio::select! {
        clients = &mut orders => {
            let load_ended = Instant::now();
            (clients?, load_ended, injector.await??)
        }
        injected = &mut injector => {
            let injected = injected??;
            let clients = orders.await?;
            (clients, Instant::now(), injected)
        }
    };
    let dead = system.heal().await?;

    let stored = await_events(system, &consumer, config.events_timeout).await?;
    if let Some(plant) = config.plant {
        plant.apply(&world, &system.stores).await?;
    }
    let mut audit = audit::audit(&world, &system.stores, &clients, &consumer.delivered()).await?;
    for exit in dead {
        audit.violations.push(exit);
    }
    Ok(Report {
        store: config.store,
        seed: config.seed,
        orders: stored as u64,
        concurrency: config.concurrency,
        load_secs: (load_ended - started).as_secs_f64(),
        injected,
        clients,
        audit,
        kept: None,
        relaxed: announced_relaxed(system.dir()),
    })
}

/// The processes whose log (`<name>.log` in `dir`) holds the warning a
/// process gives at its start when its commits are relaxed.
fn announced_relaxed(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut relaxed: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "log"))
        .filter(|path| {
            std::fs::read_to_string(path).is_ok_and(|log| log.contains("DURABILITY=relaxed"))
        })
        .filter_map(|path| Some(path.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    relaxed.sort();
    relaxed
}

/// Waits until every terminal order's terminal event has been delivered,
/// or `timeout`. Returns how many orders the store has.
async fn await_events(
    system: &System,
    consumer: &Consumer,
    timeout: Duration,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let orders = audit::stored_orders(&system.stores.orchestrator).await?;
        let missing = audit::terminal_events_missing(&orders, &consumer.delivered());
        if missing == 0 || Instant::now() > deadline {
            return Ok(orders.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies the schedule's faults at their times; returns when each struck.
async fn inject(
    system: Arc<System>,
    schedule: Schedule,
    started: Instant,
) -> anyhow::Result<Vec<Injected>> {
    let end = started + Duration::from_millis(schedule.end_ms());
    let mut injected = Vec::with_capacity(schedule.faults.len());
    for planned in schedule.faults {
        tokio::time::sleep_until(started + Duration::from_millis(planned.at_ms)).await;
        let at = Instant::now();
        let link = |link: Link| &system.links[&link];
        let ms = Duration::from_millis;
        match planned.fault {
            Fault::Kill(victim) => system.kill_and_restart(victim).await?,
            Fault::Reset(l) => link(l).reset_all(),
            Fault::Blackhole { link: l, for_ms } => link(l).blackhole_for(ms(for_ms)),
            Fault::Latency {
                link: l,
                added_ms,
                for_ms,
            } => link(l).latency_for(ms(added_ms), ms(for_ms)),
            Fault::Partition { link: l, for_ms } => link(l).partition_for(ms(for_ms)),
            Fault::BrokerCut { for_ms } => system.broker.partition_for(ms(for_ms)),
        }
        injected.push(Injected {
            fault: planned.fault,
            at,
            back_after: at.elapsed(),
        });
    }
    // The timed faults heal on their own; wait until the last one has.
    tokio::time::sleep_until(end).await;
    Ok(injected)
}
