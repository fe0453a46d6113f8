//! TLS on the gRPC port (rustls, through tonic), and optionally mTLS.
//!
//! With `TLS_CERT` and `TLS_KEY` the server speaks only TLS; with
//! `TLS_CLIENT_CA` too, it accepts only clients whose certificate that CA
//! signed. Health and reflection share the port, so a probe or `grpcurl`
//! needs the CA (`grpcurl -cacert ca.pem`), and under mTLS a certificate.
//! The files are read and checked at start-up: a bad one stops the process
//! with a message naming the setting and the file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// PEM certificate chain the gRPC server presents; with TLS_KEY it
    /// serves TLS only.
    #[arg(long, env = "TLS_CERT", value_name = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of TLS_CERT.
    #[arg(long, env = "TLS_KEY", value_name = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate: clients must present a certificate it signed (mTLS).
    #[arg(long, env = "TLS_CLIENT_CA", value_name = "TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The server's TLS, if configured; an error names what is wrong.
    pub fn server_config(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => {
                anyhow::ensure!(
                    self.tls_client_ca.is_none(),
                    "TLS_CLIENT_CA needs TLS_CERT and TLS_KEY: mTLS is TLS with client certificates"
                );
                return Ok(None);
            }
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => anyhow::bail!("TLS_CERT is set without TLS_KEY"),
            (None, Some(_)) => anyhow::bail!("TLS_KEY is set without TLS_CERT"),
        };
        let identity = Identity::from_pem(
            read_pem("TLS_CERT", cert, "CERTIFICATE")?,
            read_pem("TLS_KEY", key, "PRIVATE KEY")?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.tls_client_ca {
            config = config.client_ca_root(Certificate::from_pem(read_pem(
                "TLS_CLIENT_CA",
                ca,
                "CERTIFICATE",
            )?));
        }
        // tonic parses the PEM only when the server starts: parse it now,
        // so that a bad file stops the process before it binds.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .context("TLS_CERT / TLS_KEY / TLS_CLIENT_CA do not make a valid TLS configuration")?;
        Ok(Some(config))
    }
}

/// A PEM file and the setting that named it, so that an error can say which.
pub type PemSetting<'a> = (&'a str, &'a Path);

/// A client's TLS: the CA to trust (`None`: the system's roots), and for
/// mTLS the client's own identity (certificate, key).
pub fn client_config(
    ca: Option<PemSetting<'_>>,
    identity: Option<(PemSetting<'_>, PemSetting<'_>)>,
) -> anyhow::Result<ClientTlsConfig> {
    let mut config = match ca {
        Some((setting, path)) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
            read_pem(setting, path, "CERTIFICATE")?,
        )),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    if let Some(((cert_name, cert), (key_name, key))) = identity {
        config = config.identity(Identity::from_pem(
            read_pem(cert_name, cert, "CERTIFICATE")?,
            read_pem(key_name, key, "PRIVATE KEY")?,
        ));
    }
    Ok(config)
}

/// The file behind `setting`, which must hold a PEM block of `kind`.
pub fn read_pem(setting: &str, path: &Path, kind: &str) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("{setting}: cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    anyhow::ensure!(
        text.contains("-----BEGIN ") && text.contains(kind),
        "{setting}: {} holds no PEM {kind}",
        path.display()
    );
    Ok(pem)
}
