use clap::Parser;
use orchestrator::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    svc_kit::telemetry::init(settings.server.log_json);
    let app = orchestrator::build(settings).await?;
    app.run_until_stopped(svc_kit::shutdown::signal()).await
}
