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

/// Where [`free_port`] picks from: below Linux's ephemeral range
/// (32768-60999 by default), whose ports the kernel hands to client sockets.
/// A port taken from that range (bind to port 0, then release) can be given
/// to another test's client socket before the process that was to listen on
/// it binds it: seen in CI, an orchestrator whose METRICS_PORT was taken so
/// could not start.
const PORTS: std::ops::Range<u16> = 20_000..32_768;

/// The next candidate in [`PORTS`], as an offset; `u32::MAX` until seeded.
static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// A free loopback port for a process to listen on: outside the kernel's
/// ephemeral range, checked free by binding it, and handed out once per
/// test process (each process starts at its own place in the range, so two
/// at once rarely meet).
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::Ordering::Relaxed;
    let span = u32::from(PORTS.end - PORTS.start);
    let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
    let _ = NEXT_PORT.compare_exchange(u32::MAX, seed, Relaxed, Relaxed);
    for _ in 0..span {
        let offset = NEXT_PORT.fetch_add(1, Relaxed) % span;
        let port = PORTS.start + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {PORTS:?}")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// No port handed out lies in the kernel's ephemeral range (where a
    /// client socket may take it before its process binds it), and none is
    /// handed out twice.
    #[test]
    fn free_ports_lie_outside_the_ephemeral_range_and_are_handed_out_once() {
        let ephemeral_from: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768);
        let ports: Vec<u16> = (0..500).map(|_| free_port().unwrap()).collect();
        let mut seen = std::collections::HashSet::new();
        for port in &ports {
            assert!(*port < ephemeral_from, "{port} is an ephemeral port");
            assert!(seen.insert(*port), "{port} handed out twice");
        }
    }
}
