use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shipping_svc::run(shipping_svc::Settings::parse()).await
}
