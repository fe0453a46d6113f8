//! Services as real processes, for tests that kill them, check their exit, or
//! need one OpenTelemetry `service.name` per process.

use std::{path::Path, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

use crate::{API_KEY, binaries::free_port, eventually};

/// A service process with its fixed port, environment and store.
pub struct ServiceProcess {
    binary: String,
    pub port: u16,
    env: Vec<(String, String)>,
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
        let mut all = vec![
            ("APPLICATION_API_KEY".to_owned(), API_KEY.to_owned()),
            ("HOST".to_owned(), "127.0.0.1".to_owned()),
            ("PORT".to_owned(), port.to_string()),
            ("METRICS_PORT".to_owned(), "0".to_owned()),
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
            env: all,
            child: None,
        }
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
            .stdout(Stdio::null())
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
