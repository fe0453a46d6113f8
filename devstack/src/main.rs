//! `cargo run -p devstack`: the whole system from one command, on SQLite files,
//! with a demo catalogue and demo accounts, and the grpcurl commands to try.
//!
//! It starts the four services as child processes of itself (each runs the
//! very library its own binary runs, configured through the same env
//! variables), so each keeps its own process, logs and OpenTelemetry
//! `service.name`, as in a deployment. Ctrl-C stops them all gracefully.
//!
//! With `--replicas N` and a PostgreSQL URL for the orchestrator, it runs N
//! orchestrator replicas on that database, so that a takeover can be watched
//! on one machine: kill one (its PID is printed) and the others take its
//! sagas over.

mod seed;

// The services' allocator (see their own `main.rs`): devstack's children run
// this binary.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::{net::IpAddr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use svc_kit::durability::Durability;
use tokio::process::{Child, Command};

/// Set in a child process to the service it runs.
const ROLE_VAR: &str = "DEVSTACK_ROLE";

#[derive(Debug, Parser)]
#[command(
    name = "devstack",
    about = "Run the order saga system locally: orchestrator and the three services, on SQLite"
)]
struct Args {
    /// Folder for the four SQLite files.
    #[arg(
        long,
        env = "DATA_DIR",
        value_name = "DATA_DIR",
        default_value = "data"
    )]
    data_dir: PathBuf,

    /// Key for `x-api-key`, shared by every service in dev mode.
    #[arg(
        long,
        env = "APPLICATION_API_KEY",
        value_name = "APPLICATION_API_KEY",
        default_value = "dev-key"
    )]
    api_key: String,

    /// Key for admin RPCs (Restock, Deposit): devstack seeds with it.
    #[arg(
        long,
        env = "ADMIN_API_KEY",
        value_name = "ADMIN_API_KEY",
        default_value = "dev-admin-key"
    )]
    admin_key: String,

    /// What every service's commits wait for: `full` (the disk) or `relaxed`,
    /// which can lose the last commits when the machine crashes (see
    /// docs/durability.md).
    #[arg(
        long,
        env = "DURABILITY",
        value_name = "DURABILITY",
        value_enum,
        default_value_t = Durability::Full
    )]
    durability: Durability,

    /// Address the four servers listen on.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    host: IpAddr,

    /// Port of the orchestrator; the services take the next three.
    #[arg(long, value_name = "PORT", default_value_t = orchestrator::DEFAULT_PORT)]
    port: u16,

    /// Port of the orchestrator's /metrics; the services take the next three.
    #[arg(long, value_name = "METRICS_PORT", default_value_t = orchestrator::DEFAULT_METRICS_PORT)]
    metrics_port: u16,

    /// Port of the saga explorer (a web page) on the first orchestrator; 0: none.
    #[arg(long, value_name = "PORT", default_value_t = 8080)]
    explorer_port: u16,

    /// Orchestrator replicas to run; more than one needs a PostgreSQL URL. Replica
    /// 1 takes --port, replica i > 1 takes --port + 2 + i (after the services).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    replicas: u16,

    /// The orchestrator's store (default: a SQLite file in the data folder),
    /// e.g. postgres://postgres@127.0.0.1:5432/orders. The services stay on SQLite.
    #[arg(long, env = "ORCHESTRATOR_DATABASE_URL", value_name = "URL")]
    orchestrator_database_url: Option<String>,
}

impl Args {
    /// The gRPC and /metrics ports of orchestrator replica `i` (from 0).
    fn replica_ports(&self, i: u16) -> (u16, u16) {
        match i {
            0 => (self.port, self.metrics_port),
            i => (self.port + 3 + i, self.metrics_port + 3 + i),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(role) = std::env::var(ROLE_VAR) {
        return run_role(&role).await;
    }
    let args = Args::parse();
    let orchestrator_db = args.orchestrator_database_url.clone();
    if args.replicas > 1
        && !orchestrator_db
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres"))
    {
        bail!(
            "--replicas {} needs the orchestrator on PostgreSQL (--orchestrator-database-url postgres://…): \
             a SQLite file serves one orchestrator",
            args.replicas
        );
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data folder {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let local = |port: u16| format!("http://{}:{port}", loopback(args.host));
    let (stock_port, shipping_port, payment_port) = (args.port + 1, args.port + 2, args.port + 3);
    let sqlite = |file: &str| format!("sqlite://{}", data_dir.join(file).display());

    let mut children = Vec::new();
    let mut roles = Vec::new();
    for (offset, role, port, db) in [
        (1, "stock", stock_port, "stock.db"),
        (2, "shipping", shipping_port, "shipping.db"),
        (3, "payment", payment_port, "payment.db"),
    ] {
        let metrics = [("METRICS_PORT", (args.metrics_port + offset).to_string())];
        children.push(spawn(role, &args, port, &sqlite(db), &metrics)?);
        roles.push(role.to_owned());
    }
    let orchestrator_db = orchestrator_db.unwrap_or_else(|| sqlite("orchestrator.db"));
    let mut replicas = Vec::new();
    for i in 0..args.replicas {
        let (port, metrics_port) = args.replica_ports(i);
        let mut env = vec![
            ("METRICS_PORT", metrics_port.to_string()),
            ("STOCK_SERVICE_URL", local(stock_port)),
            ("SHIPPING_SERVICE_URL", local(shipping_port)),
            ("PAYMENT_SERVICE_URL", local(payment_port)),
        ];
        if args.replicas > 1 {
            env.push(("REPLICA_ID", format!("devstack-{}", i + 1)));
        }
        if i == 0 && args.explorer_port != 0 {
            env.push(("EXPLORER_PORT", args.explorer_port.to_string()));
        }
        let child = spawn("orchestrator", &args, port, &orchestrator_db, &env)?;
        replicas.push((local(port), child.id().unwrap_or_default()));
        children.push(child);
        roles.push(format!("orchestrator replica {}", i + 1));
    }

    // A service that can't start (say, its port is taken) stops everything.
    let (stock_url, payment_url) = (local(stock_port), local(payment_port));
    tokio::select! {
        seeded = seed::demo(&stock_url, &payment_url, &args.admin_key) => seeded?,
        exited = first_exit(&mut children, &roles) => bail!("a service could not start: {exited}"),
    }
    print_tour(&args, &local(args.port));
    if replicas.len() > 1 {
        print_replicas(&replicas);
    }

    // With replicas, one may die (that is the point): only the services are watched.
    let watched = if replicas.len() > 1 {
        3
    } else {
        children.len()
    };
    tokio::select! {
        () = svc_kit::shutdown::signal() => {}
        exited = first_exit(&mut children[..watched], &roles) => bail!("a service stopped unexpectedly: {exited}"),
    }
    for child in &children {
        if let Some(pid) = child.id() {
            // SIGTERM: each service drains its calls and exits.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    }
    Ok(())
}

/// Runs one service in this (child) process, configured by env like its binary.
async fn run_role(role: &str) -> anyhow::Result<()> {
    match role {
        "stock" => stock_svc::run(stock_svc::Settings::parse_from(["stock-svc"])).await,
        "shipping" => shipping_svc::run(shipping_svc::Settings::parse_from(["shipping-svc"])).await,
        "payment" => payment_svc::run(payment_svc::Settings::parse_from(["payment-svc"])).await,
        "orchestrator" => {
            orchestrator::run(orchestrator::Settings::parse_from(["orchestrator"])).await
        }
        other => bail!("{ROLE_VAR}={other:?} is not a service"),
    }
}

fn spawn(
    role: &str,
    args: &Args,
    port: u16,
    database_url: &str,
    extra: &[(&str, String)],
) -> anyhow::Result<Child> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .env(ROLE_VAR, role)
        .env("APPLICATION_API_KEY", &args.api_key)
        .env("ADMIN_API_KEY", &args.admin_key)
        .env("HOST", args.host.to_string())
        .env("PORT", port.to_string())
        .env("DATABASE_URL", database_url)
        .env(
            "DURABILITY",
            args.durability
                .to_possible_value()
                .expect("every durability has a name")
                .get_name(),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (key, value) in extra {
        command.env(key, value);
    }
    command
        .spawn()
        .with_context(|| format!("cannot start the {role} service"))
}

/// Which service exited first, and how.
async fn first_exit(children: &mut [Child], roles: &[String]) -> String {
    let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
    let (status, index, _) = futures::future::select_all(waits).await;
    format!(
        "the {} service exited ({status:?})",
        roles.get(index).map_or("?", String::as_str)
    )
}

fn print_replicas(replicas: &[(String, u32)]) {
    println!("Orchestrator replicas on one PostgreSQL database (each serves the whole API):");
    for (i, (url, pid)) in replicas.iter().enumerate() {
        println!("  devstack-{}  {url}  pid {pid}", i + 1);
    }
    if let Some((_, pid)) = replicas.get(1) {
        println!(
            r#"
Watch a takeover: start a few orders, then kill a replica the hard way,

  kill -9 {pid}

and the others take its open sagas over within the lease (LEASE_MS, 5 s by
default); every saga's owner and epoch are in the `sagas` table, and each
replica's /metrics counts `saga_taken_over_total`. devstack keeps running
with the replicas that are left.
"#
        );
    }
}

/// Where to reach a server bound to `host` from this machine.
fn loopback(host: IpAddr) -> IpAddr {
    if host.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host
    }
}

fn print_tour(args: &Args, orchestrator: &str) {
    let addr = orchestrator.trim_start_matches("http://");
    let key = &args.api_key;
    println!(
        r#"
The order saga system is up (data in {data}/):
  orchestrator  {addr}   stock {s}   shipping {sh}   payment {p}

Try it (grpcurl, with server reflection; no proto files needed):

  grpcurl -plaintext {addr} list

  # A completed order:
  grpcurl -plaintext -H 'x-api-key: {key}' -d '{{"request_id":"demo-1","customer_id":"alice","items":[{{"sku":"BOOK-1","quantity":1}}],"shipping_address":{{"recipient":"Alice","line1":"1 Main St","city":"Berlin","postal_code":"10115","country":"DE"}},"wait":true}}' {addr} orders.v1.OrderService/CreateOrder

  # A compensated order: "poor" cannot pay, so the shipment is cancelled and the stock released:
  grpcurl -plaintext -H 'x-api-key: {key}' -d '{{"request_id":"demo-2","customer_id":"poor","items":[{{"sku":"MUG-1","quantity":2}}],"shipping_address":{{"recipient":"Pat","line1":"2 Side St","city":"Paris","postal_code":"75001","country":"FR"}},"wait":true}}' {addr} orders.v1.OrderService/CreateOrder

  # Watch an order (use an order_id from above):
  grpcurl -plaintext -H 'x-api-key: {key}' -d '{{"order_id":"ORDER_ID"}}' {addr} orders.v1.OrderService/WatchOrder

  # Or with orderctl:
  cargo run -p orderctl -- --api-key {key} list
{explorer}
Ctrl-C stops everything; open sagas resume on the next start.
"#,
        data = args.data_dir.display(),
        s = args.port + 1,
        sh = args.port + 2,
        p = args.port + 3,
        explorer = match args.explorer_port {
            0 => String::new(),
            port => format!(
                "\nSee the sagas in the saga explorer: http://{}:{port}/ (sign in with {key},\nor with the admin key {admin} to act on them)\n",
                loopback(args.host),
                admin = args.admin_key,
            ),
        },
    );
}
