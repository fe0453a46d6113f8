// One thread is plenty: orderctl makes a few calls at a time.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    orderctl::main().await
}
