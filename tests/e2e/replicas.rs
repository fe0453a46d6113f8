//! Orchestrator replicas: several processes on one PostgreSQL database share
//! the open sagas through leases with epochs; on SQLite, one process only.

use std::{process::Stdio, time::Duration};

use ordersaga_tests::{
    Backend, TestDb,
    process::orchestrator_process,
    system::{DomainServices, Options},
};

use crate::bins;

/// A second orchestrator on a SQLite file another one uses refuses to start,
/// naming the file and what to use instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_orchestrator_on_one_sqlite_file_refuses_to_start() {
    let services = DomainServices::start(Backend::Sqlite, &Options::default()).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &[]);
    first.start().await;
    first.order_client().await;

    let second = orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &[]);
    let mut command = tokio::process::Command::new(bins::ORCHESTRATOR);
    command
        .env_clear()
        .envs(second.env().iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap();
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the second orchestrator on the same SQLite file kept running")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "it exited with {:?}",
        output.status
    );
    let file = db.url.trim_start_matches("sqlite://");
    let file = file.split('?').next().unwrap();
    assert!(
        stderr.contains(file) && stderr.contains("PostgreSQL"),
        "the refusal must name the file ({file}) and say what to use instead: {stderr}"
    );
    // The first one is unharmed.
    first.order_client().await;
}
