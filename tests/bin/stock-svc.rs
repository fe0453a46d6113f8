//! The `stock-svc` binary, built with the tests so that tests which run it as a
//! real process (to kill it, or to check its exit) never run a stale build.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    stock_svc::run(stock_svc::Settings::parse()).await
}
