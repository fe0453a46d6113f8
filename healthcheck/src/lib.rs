//! Asks a gRPC server's `grpc.health.v1.Health/Check` whether it serves.
//!
//! `grpc-health-check [--addr URL] [--service NAME]` exits 0 if the answer is
//! SERVING and 1 on anything else: NOT_SERVING, an unknown service, a refused
//! connection, no answer within the timeout (2 s), or a bad argument. Docker
//! reads 0 as healthy and 1 as unhealthy (2 is reserved), so even usage errors
//! exit 1.
//!
//! `--addr` defaults to `http://127.0.0.1:$PORT` when `PORT` is set, which in a
//! container is the port its service was told to listen on, else to
//! `http://127.0.0.1:50051`.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Fallback when neither `--addr` nor `PORT` is given: the orchestrator's port.
pub const DEFAULT_PORT: u16 = 50051;

#[derive(Debug, Parser)]
#[command(
    name = "grpc-health-check",
    version,
    about = "Exits 0 if the gRPC server reports SERVING on grpc.health.v1, 1 otherwise"
)]
pub struct Args {
    /// Server to ask. Default: http://127.0.0.1:$PORT if PORT is set, else http://127.0.0.1:50051.
    #[arg(long, value_name = "URL")]
    pub addr: Option<String>,

    /// Service to ask about, e.g. `orders.v1.OrderService`; empty asks about the server as a whole.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub service: String,

    /// Give up after this many milliseconds (connecting and asking together).
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    pub timeout_ms: u64,
}

impl Args {
    /// The address to ask: `--addr`, else the local `PORT`, else the default port.
    pub fn addr(&self, port_env: Option<&str>) -> Result<String, String> {
        if let Some(addr) = &self.addr {
            return Ok(addr.clone());
        }
        match port_env {
            None => Ok(format!("http://127.0.0.1:{DEFAULT_PORT}")),
            Some(port) => match port.trim().parse::<u16>() {
                Ok(port) if port != 0 => Ok(format!("http://127.0.0.1:{port}")),
                _ => Err(format!(
                    "PORT={port:?} names no fixed port; pass --addr instead"
                )),
            },
        }
    }
}

/// What the server answered, or why there is no answer.
pub async fn check(addr: &str, service: &str, timeout: Duration) -> Result<ServingStatus, String> {
    let endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| format!("{addr:?} is not a valid URL: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let ask = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|status| {
                format!("{addr} answered {:?}: {}", status.code(), status.message())
            })?;
        Ok(ServingStatus::try_from(reply.into_inner().status).unwrap_or(ServingStatus::Unknown))
    };
    tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// The whole command: parse, ask, and map the answer to the exit code.
pub fn cli() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) if err.use_stderr() => {
            let _ = err.print();
            return ExitCode::FAILURE;
        }
        // --help, --version
        Err(err) => err.exit(),
    };
    let addr = match args.addr(std::env::var("PORT").ok().as_deref()) {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("grpc-health-check: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("grpc-health-check: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let what = if args.service.is_empty() {
        "server".to_owned()
    } else {
        args.service.clone()
    };
    match runtime.block_on(check(&addr, &args.service, timeout)) {
        Ok(ServingStatus::Serving) => {
            println!("{what} at {addr}: SERVING");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("{what} at {addr}: {}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("grpc-health-check: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(addr: Option<&str>) -> Args {
        Args {
            addr: addr.map(str::to_owned),
            service: String::new(),
            timeout_ms: 2_000,
        }
    }

    #[test]
    fn the_address_comes_from_the_flag_then_port_then_the_default() {
        assert_eq!(
            args(Some("http://h:1")).addr(Some("50052")).unwrap(),
            "http://h:1"
        );
        assert_eq!(
            args(None).addr(Some("50052")).unwrap(),
            "http://127.0.0.1:50052"
        );
        assert_eq!(args(None).addr(None).unwrap(), "http://127.0.0.1:50051");
        assert!(args(None).addr(Some("0")).is_err());
        assert!(args(None).addr(Some("http")).is_err());
    }

    #[tokio::test]
    async fn nothing_listening_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        let result = check(
            &format!("http://127.0.0.1:{port}"),
            "",
            Duration::from_millis(500),
        )
        .await;
        assert!(result.is_err(), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
