//! `chaos`: see the crate docs. Exits 1 when the audit fails (or the run
//! breaks off), printing the seed that replays the run.

use std::{path::PathBuf, time::Duration};

use chaos::{Binaries, Plant, Profile, RunConfig, StoreKind};
use clap::{Parser, ValueEnum};
use svc_kit::durability::Durability;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Store {
    Sqlite,
    Postgres,
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileName {
    /// One fault of every kind; 1,000 orders by default.
    Short,
    /// A kill every 2–5 s and a network fault every 3–8 s for --duration-secs; 10,000 orders by default.
    Long,
    /// No fault (with --plant: shows that the audit fails).
    None,
}

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Run the whole system as real processes under a seeded schedule of faults, then audit every store and every event"
)]
struct Args {
    #[arg(long, value_enum, default_value = "both")]
    store: Store,

    #[arg(long, value_enum, default_value = "short")]
    profile: ProfileName,

    /// The schedule's seed; a failing run prints it. Random when not given.
    #[arg(long)]
    seed: Option<u64>,

    /// Orders to run (default: 1,000 short, 10,000 long).
    #[arg(short = 'n', long)]
    orders: Option<u64>,

    /// Orders in flight at once, at most.
    #[arg(short = 'c', long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,

    /// How long the long profile injects faults.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    duration_secs: u64,

    /// Start the orders over this many seconds (default: over the schedule).
    #[arg(long)]
    spread_secs: Option<u64>,

    /// Turn off the services' built-in faults (20 % of calls fail before the
    /// work, 20 % lose their reply after it).
    #[arg(long)]
    no_builtin_faults: bool,

    /// Only the schedule's kills: no network fault and no broker cut (to
    /// measure recovery from a crash with nothing else in the way).
    #[arg(long)]
    kills_only: bool,

    /// What every process's commits wait for: `full` (the disk) or
    /// `relaxed`. A relaxed run never kills PostgreSQL: relaxed commits
    /// promise nothing when the database server crashes.
    #[arg(long, value_enum, default_value_t = Durability::Full)]
    durability: Durability,

    /// Orchestrator replicas on the run's PostgreSQL (the multi-replica
    /// profile): each kill of the orchestrator strikes one replica, in turn,
    /// while the others take its sagas over. PostgreSQL only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    replicas: u64,

    /// Apply one effect a second time behind the saga's back: the audit must fail.
    #[arg(long, value_parser = clap::value_parser!(Plant))]
    plant: Option<Plant>,

    /// Folder of the orchestrator, stock-svc, shipping-svc and payment-svc
    /// binaries (default: the folder of this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,

    /// Folder of PostgreSQL's `initdb` and `postgres` (default: the newest under /usr/lib/postgresql).
    #[arg(long)]
    pg_bin_dir: Option<PathBuf>,

    #[arg(
        long,
        env = "CHAOS_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            % 1_000_000
    });
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default(),
    };
    let (profile, default_orders) = match args.profile {
        ProfileName::Short => (Profile::Short, 1_000),
        ProfileName::Long => (
            Profile::Long {
                for_ms: args.duration_secs * 1_000,
            },
            10_000,
        ),
        ProfileName::None => (Profile::None, 1_000),
    };
    let stores = match args.store {
        Store::Sqlite => vec![StoreKind::Sqlite],
        Store::Postgres => vec![StoreKind::Postgres],
        // Replicas share a PostgreSQL database; a SQLite file serves one.
        Store::Both if args.replicas > 1 => vec![StoreKind::Postgres],
        Store::Both => vec![StoreKind::Sqlite, StoreKind::Postgres],
    };
    if args.replicas > 1 && stores.contains(&StoreKind::Sqlite) {
        anyhow::bail!(
            "--replicas {} needs --store postgres: a SQLite file serves one orchestrator",
            args.replicas
        );
    }
    let mut failed = false;
    for store in stores {
        let config = RunConfig {
            store,
            profile,
            seed,
            orders: args.orders.unwrap_or(default_orders),
            concurrency: args.concurrency as usize,
            spread: args.spread_secs.map(Duration::from_secs),
            builtin_faults: !args.no_builtin_faults,
            kills_only: args.kills_only,
            durability: args.durability,
            plant: args.plant,
            binaries: Binaries::beside(&bin_dir),
            amqp_url: args.amqp_url.clone(),
            pg_bin_dir: args.pg_bin_dir.clone(),
            events_timeout: Duration::from_secs(60),
            replicas: args.replicas as usize,
        };
        let schedule = config.schedule();
        if config.durability == Durability::Relaxed && store == StoreKind::Postgres {
            println!(
                "relaxed durability: PostgreSQL is never killed (relaxed commits promise nothing when it crashes)"
            );
        }
        println!(
            "chaos on {store}, seed {seed}: {} faults over {:.0} s",
            schedule.faults.len(),
            schedule.end_ms() as f64 / 1000.0
        );
        for planned in &schedule.faults {
            println!(
                "  {:>6.1} s  {}",
                planned.at_ms as f64 / 1000.0,
                planned.fault
            );
        }
        match chaos::run(&config).await {
            Ok(report) => {
                report.print();
                failed |= !report.passed();
            }
            Err(error) => {
                eprintln!("chaos run on {store} (seed {seed}) failed: {error:#}");
                failed = true;
            }
        }
    }
    if failed {
        eprintln!("replay with: chaos --seed {seed}");
        std::process::exit(1);
    }
    Ok(())
}
