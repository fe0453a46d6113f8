//! `grpc-health-check`: the health check of every service's container.
fn main() -> std::process::ExitCode {
    grpc_health_check::cli()
}
