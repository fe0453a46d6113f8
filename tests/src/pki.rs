//! Certificates made for one test: a CA, a server certificate for
//! `localhost`/127.0.0.1 and a client certificate it signed, plus a second,
//! unrelated CA with a client of its own (what the system must not trust).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("a directory for the certificates");
        let trusted = Self::ca("ordersaga test CA");
        let other = Self::ca("some other CA");
        let write = |name: &str, pem: &str| std::fs::write(dir.path().join(name), pem).unwrap();
        write("ca.pem", &trusted.pem());
        write("other-ca.pem", &other.pem());
        for (name, issuer, usage) in [
            ("server", &trusted, ExtendedKeyUsagePurpose::ServerAuth),
            ("client", &trusted, ExtendedKeyUsagePurpose::ClientAuth),
            ("stranger", &other, ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, issuer).unwrap();
            write(&format!("{name}.pem"), &cert.pem());
            write(&format!("{name}-key.pem"), &key.serialize_pem());
        }
        Pki { dir }
    }

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// A file of the set: `ca.pem`, `other-ca.pem`, `server.pem`,
    /// `server-key.pem`, `client.pem`, `client-key.pem`, `stranger.pem`,
    /// `stranger-key.pem`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server's TLS settings, with client certificates required (mTLS).
    pub fn server_mtls(&self) -> svc_kit::tls::TlsArgs {
        svc_kit::tls::TlsArgs {
            tls_cert: Some(self.path("server.pem")),
            tls_key: Some(self.path("server-key.pem")),
            tls_client_ca: Some(self.path("ca.pem")),
        }
    }

    /// A server's TLS settings, any client welcome.
    pub fn server_tls(&self) -> svc_kit::tls::TlsArgs {
        svc_kit::tls::TlsArgs {
            tls_client_ca: None,
            ..self.server_mtls()
        }
    }

    /// A client's TLS: trusting `ca`, presenting `identity` (a name of the
    /// set, e.g. `client`) if given.
    pub fn client(&self, ca: &str, identity: Option<&str>) -> tonic::transport::ClientTlsConfig {
        let cert = identity.map(|name| self.path(&format!("{name}.pem")));
        let key = identity.map(|name| self.path(&format!("{name}-key.pem")));
        let identity = cert
            .as_deref()
            .zip(key.as_deref())
            .map(|(cert, key)| (("cert", cert), ("key", key)));
        svc_kit::tls::client_config(Some(("ca", &self.path(ca))), identity).unwrap()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
