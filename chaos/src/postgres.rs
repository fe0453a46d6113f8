//! A PostgreSQL server of the run's own, so that the runner can kill it with
//! SIGKILL (the postmaster and every backend, as a power cut would) and
//! restart it into WAL recovery without touching anyone else's server.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection};
use tokio::{
    process::{Child, Command},
    time::Instant,
};

use crate::processes::{free_port, signal};

pub struct Postgres {
    bin_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    pub port: u16,
    /// PostgreSQL refuses to run as root: then it runs as the `postgres` user.
    run_as: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    /// `initdb` under `root`, with fsync and synchronous commit on (the
    /// defaults), then starts it.
    pub async fn create(root: &Path, bin_dir: Option<PathBuf>) -> anyhow::Result<Postgres> {
        let bin_dir = match bin_dir {
            Some(dir) => dir,
            None => find_bin_dir()?,
        };
        let run_as = if is_root() {
            Some(user_ids("postgres").context(
                "running as root, PostgreSQL needs a `postgres` user to run as, and there is none",
            )?)
        } else {
            None
        };
        let pg_root = root.join("postgres");
        let (data_dir, socket_dir) = (pg_root.join("data"), pg_root.join("socket"));
        for dir in [&pg_root, &data_dir, &socket_dir] {
            std::fs::create_dir_all(dir)?;
        }
        // As /proc shows a backend's working folder (see `working_in`).
        let data_dir = std::fs::canonicalize(&data_dir)?;
        // The run's folder may be private to root: the server must reach its own.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some((uid, gid)) = run_as {
            for dir in [&pg_root, &data_dir, &socket_dir] {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
            }
        }
        let mut pg = Postgres {
            bin_dir,
            log: pg_root.join("postgres.log"),
            data_dir,
            socket_dir,
            port: free_port()?,
            run_as,
            child: None,
        };
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(&pg.data_dir)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null());
        let output = initdb.output().await.context("cannot run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        pg.start().await?;
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    /// Starts the server (after a kill: with crash recovery) and waits until
    /// it takes connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&self.log, Some(uid), Some(gid))?;
        }
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-k")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=300"])
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(command.spawn().context("cannot start postgres")?);
        self.wait_ready(Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if PgConnection::connect(&self.url("postgres")).await.is_ok() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "postgres exited at start-up ({status}); see {}",
                    self.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!("postgres took no connection within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// From now on, TCP clients must come over TLS with `cert`/`key` as the
    /// server's identity: a plaintext client is refused by `pg_hba.conf`.
    /// Applied with a configuration reload; returns once plaintext is refused.
    pub async fn require_tls(&mut self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
            let to = self.data_dir.join(name);
            std::fs::copy(from, &to)
                .with_context(|| format!("cannot copy {} into the data folder", from.display()))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid))?;
            }
        }
        let conf = self.data_dir.join("postgresql.conf");
        let mut settings = std::fs::read_to_string(&conf)?;
        settings
            .push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, settings)?;
        std::fs::write(
            self.data_dir.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 trust\n\
             hostnossl all all 0.0.0.0/0 reject\n",
        )?;
        let mut admin = PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut admin)
            .await?;
        let plaintext = format!("{}?sslmode=disable", self.url("postgres"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while PgConnection::connect(&plaintext).await.is_ok() {
            if Instant::now() > deadline {
                bail!("PostgreSQL still takes plaintext clients 10 s after the reload");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Ok(())
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let mut admin = PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        Ok(self.url(name))
    }

    /// SIGKILL to the postmaster and to every backend, then waits until
    /// none is left. Killing only the postmaster would leave backends holding
    /// the shared memory, and the restart would refuse to start. Each backend
    /// is a process group of its own (PostgreSQL calls `setsid`), so no one
    /// signal reaches them all: the postmaster is frozen first, so that it
    /// forks nothing while its children are listed, and every process still
    /// working in the data folder is swept up afterwards.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let Some(pid) = child.id() else {
            return Ok(());
        };
        signal(pid, "STOP");
        let backends = children_of(pid);
        signal(pid, "KILL");
        for backend in backends {
            signal(backend, "KILL");
        }
        child.wait().await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = working_in(&self.data_dir);
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("PostgreSQL processes {left:?} outlived SIGKILL for 10 s");
            }
            for pid in left {
                signal(pid, "KILL");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn stop(&mut self) {
        let _ = self.kill9().await;
    }
}

/// The newest server installed under /usr/lib/postgresql, else the one
/// `pg_config` names.
fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let output = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .context("no PostgreSQL server found under /usr/lib/postgresql, and no pg_config on PATH: pass --pg-bin-dir")?;
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&user) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// The PIDs whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    processes()
        .filter(|(_, stat)| stat.ppid == pid)
        .map(|(child, _)| child)
        .collect()
}

/// The live processes whose working folder is `dir` (PostgreSQL's backends
/// work in the data folder), from /proc.
fn working_in(dir: &Path) -> Vec<u32> {
    processes()
        .filter(|(pid, stat)| {
            stat.state != 'Z'
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
        })
        .map(|(pid, _)| pid)
        .collect()
}

struct Stat {
    state: char,
    ppid: u32,
}

/// Every process, with its state and parent, from /proc.
fn processes() -> impl Iterator<Item = (u32, Stat)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid = fields.next()?.parse().ok()?;
            Some((pid, Stat { state, ppid }))
        })
}
