//! `cargo run -p devstack`: the whole system in one process, on SQLite files,
//! with a demo catalogue and demo accounts, and the grpcurl commands to try.
//!
//! Each service is the same library the standalone binaries run, on its usual
//! port with its own store, so what you try here is what you deploy.

mod seed;

use std::{net::IpAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use orchestrator::downstream::DownstreamArgs;
use svc_kit::settings::ServerArgs;
use tokio::sync::watch;

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

    /// Address the four servers listen on.
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    host: IpAddr,

    /// Port of the orchestrator; the services take the next three.
    #[arg(long, value_name = "PORT", default_value_t = orchestrator::DEFAULT_PORT)]
    port: u16,

    /// Write logs as JSON lines.
    #[arg(long, env = "LOG_JSON")]
    log_json: bool,
}

fn server_args(args: &Args, port: u16, db_file: &str) -> anyhow::Result<ServerArgs> {
    let path = args.data_dir.join(db_file);
    let path = path.to_str().context("DATA_DIR must be valid UTF-8")?;
    let mut server = ServerArgs::local(format!("sqlite://{path}"), &args.api_key);
    server.host = args.host;
    server.port = Some(port);
    Ok(server)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    svc_kit::telemetry::init(args.log_json);
    let (stock_port, shipping_port, payment_port) = (args.port + 1, args.port + 2, args.port + 3);

    let stock = stock_svc::build(stock_svc::Settings {
        server: server_args(&args, stock_port, "stock.db")?,
    })
    .await?;
    let mut shipping_settings = shipping_svc::Settings::local("", &args.api_key);
    shipping_settings.server = server_args(&args, shipping_port, "shipping.db")?;
    let shipping = shipping_svc::build(shipping_settings).await?;
    let payment = payment_svc::build(payment_svc::Settings {
        server: server_args(&args, payment_port, "payment.db")?,
    })
    .await?;
    let local = |port: u16| format!("http://{}:{port}", loopback(args.host));
    let downstream =
        DownstreamArgs::local(local(stock_port), local(shipping_port), local(payment_port));
    let mut orchestrator_settings = orchestrator::Settings::local("", &args.api_key, downstream);
    orchestrator_settings.server = server_args(&args, args.port, "orchestrator.db")?;
    let orchestrator = orchestrator::build(orchestrator_settings).await?;

    let (stop, stopped) = watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let servers = [
        tokio::spawn(stock.run_until_stopped(until_stopped())),
        tokio::spawn(shipping.run_until_stopped(until_stopped())),
        tokio::spawn(payment.run_until_stopped(until_stopped())),
        tokio::spawn(orchestrator.run_until_stopped(until_stopped())),
    ];

    seed::demo(&local(stock_port), &local(payment_port), &args.api_key).await?;
    print_tour(&args, &local(args.port));

    svc_kit::shutdown::signal().await;
    stop.send_replace(true);
    for server in servers {
        server.await??;
    }
    Ok(())
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

Ctrl-C stops everything; open sagas resume on the next start.
"#,
        data = args.data_dir.display(),
        s = args.port + 1,
        sh = args.port + 2,
        p = args.port + 3,
    );
}
