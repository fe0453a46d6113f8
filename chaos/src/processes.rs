//! The four services as real processes, each on a fixed port so that a
//! restart comes back where its callers look for it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{
    net::TcpStream,
    process::{Child, Command},
    time::Instant,
};

/// A free loopback port (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where the service binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub orchestrator: PathBuf,
    pub stock: PathBuf,
    pub shipping: PathBuf,
    pub payment: PathBuf,
}

impl Binaries {
    /// The release or debug binaries beside this one (`cargo build -p
    /// orchestrator -p stock-svc -p shipping-svc -p payment-svc` puts them there).
    pub fn beside(dir: &Path) -> Binaries {
        Binaries {
            orchestrator: dir.join("orchestrator"),
            stock: dir.join("stock-svc"),
            shipping: dir.join("shipping-svc"),
            payment: dir.join("payment-svc"),
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        for binary in [
            &self.orchestrator,
            &self.stock,
            &self.shipping,
            &self.payment,
        ] {
            if !binary.is_file() {
                bail!(
                    "{} does not exist: build it (cargo build --release -p orchestrator -p stock-svc -p shipping-svc -p payment-svc) or pass --bin-dir",
                    binary.display()
                );
            }
        }
        Ok(())
    }
}

/// One service process, started and restarted with the same environment.
pub struct ServiceProcess {
    pub name: String,
    binary: PathBuf,
    pub port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl ServiceProcess {
    pub fn new(
        name: impl Into<String>,
        binary: &Path,
        port: u16,
        env: Vec<(String, String)>,
        log_dir: &Path,
    ) -> ServiceProcess {
        let name = name.into();
        ServiceProcess {
            log: log_dir.join(format!("{name}.log")),
            name,
            binary: binary.to_owned(),
            port,
            env,
            child: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Starts the process; its output goes to `<name>.log` (appended across
    /// restarts).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(&self.binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", self.port.to_string())
            .env("METRICS_PORT", "0")
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(
            command
                .spawn()
                .with_context(|| format!("cannot start {}", self.binary.display()))?,
        );
        Ok(())
    }

    /// Waits until the port accepts connections, or the process dies.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect(self.addr()).await.is_ok() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited at start-up ({status}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!("{} did not listen within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Whether it died on its own (a crash the runner did not cause).
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited on its own ({status})", self.name)),
            _ => None,
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                signal(pid, "TERM");
            }
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// Sends `kill -<signal> <pid>`.
pub fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
