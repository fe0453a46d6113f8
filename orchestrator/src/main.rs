use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orchestrator::run(orchestrator::Settings::parse()).await
}
