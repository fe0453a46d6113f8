//! How this process shares its store with other orchestrators.
//!
//! - On PostgreSQL it is one replica among any number: each saga is driven
//!   by one replica at a time, under a lease with an epoch (see
//!   `saga_engine::replicas`). Every replica serves the whole API.
//! - A SQLite file serves one orchestrator process. A second one on the same
//!   file is refused at start-up: it would resume and drive the same sagas.
//!   The lock is an OS file lock, so a process killed with SIGKILL releases
//!   it with its life.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use saga_engine::{Ownership, ReplicaSettings};

#[derive(Debug, Clone, Args)]
pub struct ReplicaArgs {
    /// This replica's ID, unique among the replicas on one PostgreSQL database
    /// (default: the host name, which Kubernetes and Compose make unique per
    /// replica). A replica restarted under the same ID takes its open sagas
    /// back at once; a second live process under the same ID makes the first stop.
    #[arg(long, env = "REPLICA_ID", value_name = "REPLICA_ID")]
    pub replica_id: Option<String>,

    /// How long a replica's sagas stay its own without a renewal of its lease,
    /// in milliseconds. After a crash, the other replicas take its sagas over
    /// within this time plus a fifth of it.
    #[arg(long, env = "LEASE_MS", value_name = "LEASE_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(500..=600_000))]
    pub lease_ms: u64,
}

impl Default for ReplicaArgs {
    fn default() -> Self {
        ReplicaArgs {
            replica_id: None,
            lease_ms: 5_000,
        }
    }
}

impl ReplicaArgs {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// The replica ID: the one set, or the host name.
    pub fn id(&self) -> String {
        self.replica_id
            .clone()
            .filter(|id| !id.trim().is_empty())
            .or_else(host_name)
            .unwrap_or_else(|| "orchestrator".into())
    }

    /// The engine's ownership for a store at `database_url`.
    pub fn ownership(&self, database_url: &str) -> Ownership {
        if database_url.starts_with("postgres") {
            Ownership::Replica(ReplicaSettings {
                id: self.id(),
                lease: self.lease(),
                database_url: database_url.to_owned(),
            })
        } else {
            Ownership::Alone
        }
    }
}

fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
}

/// The one orchestrator on a SQLite file, for as long as it is held.
pub struct SqliteLock {
    _file: File,
}

impl SqliteLock {
    /// Locks `<database>.lock`, or says which file another orchestrator uses
    /// and what to use instead.
    pub fn acquire(database: &Path) -> anyhow::Result<SqliteLock> {
        let path = lock_path(database);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open the lock file {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (process {pid})"),
                };
                anyhow::bail!(
                    "the SQLite store {} is in use by another orchestrator{holder}, which holds {}. \
                     A SQLite file serves one orchestrator process; to run several replicas, \
                     point them all at one PostgreSQL database (DATABASE_URL=postgres://…)",
                    database.display(),
                    path.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("cannot lock {}: {e}", path.display())
            }
        }
        // Who holds it, for the message a second process prints.
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(SqliteLock { _file: file })
    }
}

fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_file_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("orchestrator.db");
        let first = SqliteLock::acquire(&db).unwrap();
        let refused = SqliteLock::acquire(&db).err().unwrap().to_string();
        assert!(refused.contains(&db.display().to_string()), "{refused}");
        assert!(refused.contains("PostgreSQL"), "{refused}");
        assert!(
            refused.contains(&std::process::id().to_string()),
            "{refused}"
        );
        drop(first);
        SqliteLock::acquire(&db).expect("free again once the first is dropped");
    }

    #[test]
    fn only_postgres_makes_a_replica() {
        let args = ReplicaArgs {
            replica_id: Some("r1".into()),
            lease_ms: 2_000,
        };
        match args.ownership("postgres://u@h/db") {
            Ownership::Replica(r) => {
                assert_eq!((r.id.as_str(), r.lease), ("r1", Duration::from_secs(2)))
            }
            Ownership::Alone => panic!("PostgreSQL makes a replica"),
        }
        assert!(matches!(
            args.ownership("sqlite://data/o.db"),
            Ownership::Alone
        ));
    }
}
