//! `orderbench`: see the crate docs.

use clap::{Parser, Subcommand};
use orderbench::{
    BenchConfig, check,
    cpu::{self, Target},
    echo, overload,
    report::{Ceiling, EchoPair, Report},
    run, setup,
};

/// The processes whose CPU a run accounts: the four services by the port they
/// listen on, every PostgreSQL process, and orderbench itself.
fn cpu_targets(args: &Args) -> Vec<Target> {
    let port = |url: &str| {
        url.rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
    };
    let mut targets = vec![];
    for url in args.addr.split(',') {
        if let Some(port) = port(url) {
            targets.push(Target::Port("orchestrator", port));
        }
    }
    for (name, url) in [
        ("stock", &args.stock_addr),
        ("shipping", &args.shipping_addr),
        ("payment", &args.payment_addr),
    ] {
        if let Some(port) = port(url) {
            targets.push(Target::Port(name, port));
        }
    }
    targets.push(Target::Comm("postgres", "postgres"));
    targets.push(Target::Own("(orderbench)"));
    targets
}

#[derive(Debug, Parser)]
#[command(
    name = "orderbench",
    about = "Load an OrderService with N orders at concurrency C; check conservation"
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// The OrderService (orchestrator); replicas as a comma-separated list,
    /// over which the orders are spread in turn (client-side balancing).
    #[arg(
        long,
        env = "ORDERBENCH_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,

    /// The stock service, for set-up and the conservation check.
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    stock_addr: String,

    /// The payment service, for set-up and the conservation check.
    #[arg(long, default_value = "http://127.0.0.1:50054")]
    payment_addr: String,

    /// The shipping service, only to account its CPU.
    #[arg(long, default_value = "http://127.0.0.1:50053")]
    shipping_addr: String,

    /// Calls of the RPC ceiling measured before the run and again after it,
    /// at the run's concurrency (a quarter of them at C=1); 0 skips it.
    #[arg(long, default_value_t = 20_000)]
    echo_calls: u64,

    #[arg(
        long,
        env = "APPLICATION_API_KEY",
        hide_env_values = true,
        default_value = "dev-key"
    )]
    api_key: String,

    /// The admin key, to restock and deposit for the run.
    #[arg(
        long,
        env = "ADMIN_API_KEY",
        hide_env_values = true,
        default_value = "dev-admin-key"
    )]
    admin_key: String,

    /// Orders to run.
    #[arg(short = 'n', long, default_value_t = 2_000)]
    orders: u64,

    /// Orders in flight at once.
    #[arg(short = 'c', long, default_value_t = 64)]
    concurrency: usize,

    /// Share of orders whose customer can't pay, so they compensate.
    #[arg(long, default_value_t = 0.1, value_parser = parse_share)]
    compensate_share: f64,

    /// One JSON result line instead of the text report.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates the orders without waiting for them (to fill the orchestrator
    /// with sagas in flight), then exits.
    Flood,
    /// Waits until no saga is open, and prints how long that took.
    Drain {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// The normal load (N orders at C) gives the sustained rate; then orders
    /// are offered open-loop at FACTOR times it for SECONDS. Prints what was
    /// admitted (rate, p99 against the normal p99), the share refused and how
    /// fast a refusal came back. Configure the system's limits first
    /// (MAX_INFLIGHT_SAGAS, MAX_WAITING_SAGAS, MAX_CONCURRENT_CALLS).
    Overload {
        #[arg(long, default_value_t = 10.0)]
        factor: f64,
        /// Offer this many orders per second instead of FACTOR times the
        /// normal rate: two builds compared at the same offered load.
        #[arg(long, value_name = "ORDERS_PER_S")]
        rate: Option<f64>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// The RPC ceiling: a tonic unary call over loopback at the same concurrency.
    Echo {
        #[arg(short = 'n', long, default_value_t = 100_000)]
        calls: u64,
        #[arg(short = 'c', long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
}

fn parse_share(value: &str) -> Result<f64, String> {
    let share: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("{share} is outside 0.0..=1.0"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Echo {
        calls,
        concurrency,
        json,
    }) = args.command
    {
        let report = echo::ceiling(calls, concurrency.max(1)).await?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "echo ceiling: {} calls at C={}: {:.0} calls/s, p50 {:.3} ms, p99 {:.3} ms",
                report.calls, report.concurrency, report.calls_per_s, report.p50_ms, report.p99_ms
            );
        }
        return Ok(());
    }
    let config = BenchConfig {
        orders_addr: args.addr.clone(),
        stock_addr: args.stock_addr.clone(),
        payment_addr: args.payment_addr.clone(),
        api_key: args.api_key.clone(),
        admin_key: args.admin_key.clone(),
        orders: args.orders,
        concurrency: args.concurrency.max(1),
        compensate_share: args.compensate_share,
        progress: !args.json,
    };
    match args.command {
        Some(Command::Flood) => {
            let world = setup::prepare(&config).await?;
            let created = run::flood(&config, &world).await?;
            println!("created {created} orders without waiting");
            return Ok(());
        }
        Some(Command::Overload {
            factor,
            rate,
            seconds,
        }) => {
            let offer = match rate {
                Some(per_s) => overload::Offer::Rate(per_s),
                None => overload::Offer::Factor(factor),
            };
            let report = overload::run(&config, offer, seconds, &cpu_targets(&args)).await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print();
            }
            return Ok(());
        }
        Some(Command::Drain { timeout_secs }) => {
            let elapsed = run::drain(&config, std::time::Duration::from_secs(timeout_secs)).await?;
            println!("no open saga left after {:.2} s", elapsed.as_secs_f64());
            return Ok(());
        }
        _ => {}
    }
    // The ceiling is measured before the run and again after it.
    let echo_pair = || async {
        anyhow::Ok(EchoPair {
            c1: echo::ceiling((args.echo_calls / 4).max(1_000), 1).await?,
            at_c: echo::ceiling(args.echo_calls, config.concurrency).await?,
        })
    };
    let ceiling_before = match args.echo_calls {
        0 => None,
        _ => Some(echo_pair().await?),
    };
    let world = setup::prepare(&config).await?;
    let targets = cpu_targets(&args);
    let cpu_before = cpu::sample(&targets);
    let load = run::orders(&config, &world).await?;
    let cpu_after = cpu::sample(&targets);
    let verdict = check::conservation(&config, &world, &load).await?;
    let mut report = Report::new(&config, &load, &verdict);
    let finished: u64 = load.outcomes.values().sum();
    report.cpu_ms_per_saga = cpu::per_unit(&cpu_before, &cpu_after, finished as f64);
    report.cpu_ms_per_saga_by_thread =
        cpu::per_unit_by_thread(&cpu_before, &cpu_after, finished as f64);
    if let Some(before) = &ceiling_before {
        let after = echo_pair().await?;
        report.ceiling = Some(Ceiling::new(
            before,
            &after,
            report.sagas_per_s,
            report.p50_ms,
        ));
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print();
    }
    if !verdict.passed() {
        std::process::exit(1);
    }
    Ok(())
}
