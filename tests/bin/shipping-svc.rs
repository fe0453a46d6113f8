//! The `shipping-svc` binary, built with the tests so that tests which run it as a
//! real process (to kill it, or to check its exit) never run a stale build.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shipping_svc::run(shipping_svc::Settings::parse()).await
}
