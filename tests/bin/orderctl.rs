//! `orderctl`, built with the tests, so they run the very command users run.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    orderctl::main().await
}
