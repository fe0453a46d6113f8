//! Services as real processes, for tests that kill them, check their exit, or
//! need one OpenTelemetry `service.name` per process.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

use ordersaga_proto::client::OrderClient;

use crate::{ADMIN_KEY, API_KEY, binaries::free_port, eventually, system::DomainServices};

/// The orchestrator as a real process (`binary`), on the store at `db_url`,
/// driving `services`, with fast retries and `env` on top.
pub fn orchestrator_process(
    binary: &str,
    data_dir: &Path,
    db_url: &str,
    services: &DomainServices,
    env: &[(&str, String)],
) -> ServiceProcess {
    let (stock, shipping, payment) = services.endpoints();
    let mut all = vec![
        ("DATABASE_URL", db_url.to_owned()),
        ("STOCK_SERVICE_URL", stock),
        ("SHIPPING_SERVICE_URL", shipping),
        ("PAYMENT_SERVICE_URL", payment),
        ("RETRY_INITIAL_BACKOFF_MS", "5".to_owned()),
        ("RETRY_MAX_BACKOFF_MS", "100".to_owned()),
        ("COMPENSATION_MAX_BACKOFF_MS", "100".to_owned()),
        ("STEP_MAX_ATTEMPTS", "40".to_owned()),
    ];
    all.extend(env.iter().cloned());
    ServiceProcess::new(binary, data_dir, "orchestrator", &all)
}

/// A service process with its fixed port, environment and store.
pub struct ServiceProcess {
    binary: String,
    pub port: u16,
    pub metrics_port: u16,
    env: Vec<(String, String)>,
    /// Where its standard output (its log lines) goes; nowhere by default.
    stdout: Option<PathBuf>,
    child: Option<Child>,
}

impl ServiceProcess {
    /// Prepares (does not start) `binary` on a free port with a SQLite store
    /// in `data_dir`, plus `env`.
    pub fn new(
        binary: &str,
        data_dir: &Path,
        name: &str,
        env: &[(&str, String)],
    ) -> ServiceProcess {
        let port = free_port();
        let metrics_port = free_port();
        let mut all = vec![
            ("APPLICATION_API_KEY".to_owned(), API_KEY.to_owned()),
            ("ADMIN_API_KEY".to_owned(), ADMIN_KEY.to_owned()),
            ("HOST".to_owned(), "127.0.0.1".to_owned()),
            ("PORT".to_owned(), port.to_string()),
            ("METRICS_PORT".to_owned(), metrics_port.to_string()),
            (
                "DATABASE_URL".to_owned(),
                format!("sqlite://{}", data_dir.join(format!("{name}.db")).display()),
            ),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
        ];
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push(((*k).to_owned(), v.clone()));
        }
        ServiceProcess {
            binary: binary.to_owned(),
            port,
            metrics_port,
            env: all,
            stdout: None,
            child: None,
        }
    }

    /// Sets (or replaces) an environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: impl Into<String>) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.into()));
    }

    /// Appends its log lines (standard output) to `path` from the next start.
    pub fn log_to(&mut self, path: &Path) {
        self.stdout = Some(path.to_owned());
    }

    /// The environment it starts with.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until it accepts connections.
    pub async fn start(&mut self) {
        let mut command = Command::new(&self.binary);
        command
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(match &self.stdout {
                Some(path) => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map(Stdio::from)
                    .expect("open the service's log file"),
                None => Stdio::null(),
            })
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        self.child = Some(command.spawn().expect("start the service process"));
        let addr = format!("127.0.0.1:{}", self.port);
        eventually("the service to listen", Duration::from_secs(30), || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
        })
        .await;
    }

    /// Its `/metrics` page.
    pub async fn scrape(&self) -> String {
        crate::services::scrape(([127, 0, 0, 1], self.metrics_port).into()).await
    }

    /// Waits for the process to end by itself (e.g. at an armed crash point).
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the process was started");
        tokio::time::timeout(timeout, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {timeout:?}", self.binary))
            .expect("wait for the process")
    }

    /// An OrderService client, once the process answers.
    pub async fn order_client(&self) -> OrderClient {
        let endpoint = self.endpoint();
        eventually(
            "the orchestrator to answer",
            Duration::from_secs(30),
            || {
                let endpoint = endpoint.clone();
                async move {
                    let client = OrderClient::connect(endpoint, API_KEY).await.ok()?;
                    client.list_orders(Default::default()).await.ok()?;
                    Some(client)
                }
            },
        )
        .await
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the running process.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .expect("the process runs")
            .to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid} failed");
    }

    /// SIGKILL, as `kill -9`.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill -9");
        }
    }

    /// SIGTERM, then waits for a clean exit (which flushes telemetry).
    pub async fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().expect("pid").to_string();
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
            let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .expect("exits after SIGTERM")
                .unwrap();
            assert!(status.success(), "{} exited with {status:?}", self.binary);
        }
    }
}
