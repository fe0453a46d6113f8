use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    payment_svc::run(payment_svc::Settings::parse()).await
}
