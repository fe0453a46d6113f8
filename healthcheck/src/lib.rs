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
//!
//! A server that speaks TLS (its `TLS_CERT` set) is asked over TLS when the
//! check is given the CA that signed its certificate: `--tls-ca` or
//! `HEALTHCHECK_TLS_CA`; the default address is then `https://`. Under mTLS
//! (`TLS_CLIENT_CA`) it also needs a client certificate the server's CA
//! signed: `--tls-cert`/`--tls-key` or `HEALTHCHECK_TLS_CERT`/`_KEY`.
//! `--tls-domain` (`HEALTHCHECK_TLS_DOMAIN`) names the host the server's
//! certificate was issued to, when it is not the address's host. The
//! variables let a compose file keep one health check line for both.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
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

    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How to reach a server that speaks TLS.
#[derive(Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM file of the CA that signed the server's certificate; asks over TLS.
    #[arg(long, env = "HEALTHCHECK_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// PEM file of a client certificate, for a server that requires one (mTLS).
    #[arg(
        long,
        env = "HEALTHCHECK_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM file of the client certificate's private key.
    #[arg(
        long,
        env = "HEALTHCHECK_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// The host the server's certificate names, if not the address's host.
    #[arg(long, env = "HEALTHCHECK_TLS_DOMAIN", value_name = "NAME")]
    pub tls_domain: Option<String>,
}

impl TlsArgs {
    /// The client's TLS settings, read from their files; `None` without a CA.
    pub fn config(&self) -> Result<Option<ClientTlsConfig>, String> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() || self.tls_domain.is_some() {
                return Err("--tls-cert and --tls-domain need --tls-ca".into());
            }
            return Ok(None);
        };
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        if let Some(domain) = &self.tls_domain {
            config = config.domain_name(domain.clone());
        }
        Ok(Some(config))
    }
}

impl Args {
    /// The address to ask: `--addr`, else the local `PORT`, else the default
    /// port; `https://` for the last two when a CA is given.
    pub fn addr(&self, port_env: Option<&str>) -> Result<String, String> {
        if let Some(addr) = &self.addr {
            return Ok(addr.clone());
        }
        let scheme = match self.tls.tls_ca {
            Some(_) => "https",
            None => "http",
        };
        match port_env {
            None => Ok(format!("{scheme}://127.0.0.1:{DEFAULT_PORT}")),
            Some(port) => match port.trim().parse::<u16>() {
                Ok(port) if port != 0 => Ok(format!("{scheme}://127.0.0.1:{port}")),
                _ => Err(format!(
                    "PORT={port:?} names no fixed port; pass --addr instead"
                )),
            },
        }
    }
}

/// What the server answered, or why there is no answer.
pub async fn check(
    addr: &str,
    service: &str,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
) -> Result<ServingStatus, String> {
    let mut endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| format!("{addr:?} is not a valid URL: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS settings for {addr}: {e}"))?;
    }
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
    let tls = match args.tls.config() {
        Ok(tls) => tls,
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
    match runtime.block_on(check(&addr, &args.service, timeout, tls)) {
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
            tls: TlsArgs::default(),
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
        let mut tls = args(None);
        tls.tls.tls_ca = Some("ca.pem".into());
        assert_eq!(tls.addr(Some("50052")).unwrap(), "https://127.0.0.1:50052");
    }

    #[test]
    fn a_client_certificate_without_a_ca_or_an_unreadable_file_is_refused_by_name() {
        let mut tls = TlsArgs {
            tls_cert: Some("client.pem".into()),
            tls_key: Some("client-key.pem".into()),
            ..TlsArgs::default()
        };
        assert!(tls.config().unwrap_err().contains("need --tls-ca"));
        tls.tls_ca = Some("/nonexistent/ca.pem".into());
        let err = tls.config().unwrap_err();
        assert!(err.starts_with("--tls-ca /nonexistent/ca.pem"), "{err}");
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
            None,
        )
        .await;
        assert!(result.is_err(), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
