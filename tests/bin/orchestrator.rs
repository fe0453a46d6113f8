//! The `orchestrator` binary, built with the tests so that tests which run it as a
//! real process (to kill it, or to check its exit) never run a stale build.
//! Unlike the production binary, it arms the crash points named in `CRASH_POINTS`.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orchestrator::crash_points::arm_from_env().map_err(anyhow::Error::msg)?;
    orchestrator::run(orchestrator::Settings::parse()).await
}
