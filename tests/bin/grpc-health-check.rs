//! The `grpc-health-check` binary of the service images, built with the tests
//! so that the compose test runs each container's health check as compose would.
fn main() -> std::process::ExitCode {
    grpc_health_check::cli()
}
