use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    stock_svc::run(stock_svc::Settings::parse()).await
}
