//! The chaos runner (chaos/) on both stores: its short profile strikes once
//! with every kind of fault while 1,000 orders run, and nothing may be lost,
//! doubled or stuck; and its audit fails when an effect is applied twice
//! behind the saga's back. The runner starts PostgreSQL servers of its own
//! (it kills them), never the shared one.
//!
//! `CHAOS_SEED` replays another schedule; a failing run prints its seed.

use std::time::Duration;

use ::chaos::{Binaries, Plant, Profile, Report, RunConfig, StoreKind};
use ordersaga_tests::{Backend, broker::rabbitmq_url};
use svc_kit::durability::Durability;

use crate::bins;

on_both_stores!(
    the_short_profile_loses_doubles_and_strands_nothing,
    an_effect_applied_twice_fails_the_audit,
    relaxed_commits_lose_nothing_when_each_process_is_killed,
);

fn config(backend: Backend, profile: Profile, orders: u64) -> RunConfig {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_201);
    RunConfig {
        store: match backend {
            Backend::Sqlite => StoreKind::Sqlite,
            Backend::Postgres => StoreKind::Postgres,
        },
        profile,
        seed,
        orders,
        concurrency: 32,
        spread: None,
        builtin_faults: true,
        kills_only: false,
        durability: Durability::Full,
        plant: None,
        binaries: Binaries {
            orchestrator: bins::ORCHESTRATOR.into(),
            stock: bins::STOCK.into(),
            shipping: bins::SHIPPING.into(),
            payment: bins::PAYMENT.into(),
        },
        amqp_url: rabbitmq_url(),
        pg_bin_dir: None,
        events_timeout: Duration::from_secs(60),
        replicas: 1,
    }
}

async fn run(config: &RunConfig) -> Report {
    let report = ::chaos::run(config)
        .await
        .unwrap_or_else(|e| panic!("the chaos run broke off: {e:#}"));
    report.print();
    report
}

/// The audit passed: nothing lost, doubled or stuck, no event lost.
fn assert_clean(config: &RunConfig, report: &Report) {
    assert!(
        report.passed(),
        "seed {}: {:#?}",
        config.seed,
        report.audit.violations
    );
    assert_eq!(
        (
            report.audit.lost,
            report.audit.doubled,
            report.audit.stuck,
            report.audit.events_lost
        ),
        (0, 0, 0, 0)
    );
}

async fn the_short_profile_loses_doubles_and_strands_nothing(backend: Backend) {
    let config = config(backend, Profile::Short, 1_000);
    let report = run(&config).await;
    assert_clean(&config, &report);
    assert_eq!(report.orders, 1_000);
    let kinds = if backend == Backend::Postgres { 10 } else { 9 };
    assert_eq!(report.injected.len(), kinds, "one fault of every kind");
    assert!(
        report.orders_crossing_a_crash() > 0,
        "no order was in flight at a crash: the run proves little"
    );
}

/// `DURABILITY=relaxed` everywhere: a commit is written but not flushed
/// before it is acknowledged. What docs/durability.md promises of it: a
/// `kill -9` of any of the four processes loses nothing (what was written
/// is in the operating system's hands). Only a crash of the machine, or of
/// the PostgreSQL server, may lose the last commits, and neither is struck.
async fn relaxed_commits_lose_nothing_when_each_process_is_killed(backend: Backend) {
    let mut config = config(backend, Profile::Short, 400);
    config.kills_only = true;
    config.durability = Durability::Relaxed;
    let report = run(&config).await;
    assert_clean(&config, &report);
    let killed: Vec<_> = report
        .injected
        .iter()
        .map(|i| i.fault.to_string())
        .collect();
    assert_eq!(
        report.relaxed,
        ["orchestrator", "payment-svc", "shipping-svc", "stock-svc"],
        "every process ran with relaxed commits"
    );
    assert_eq!(
        killed.len(),
        4,
        "each of the four processes, once: {killed:?}"
    );
    assert!(
        killed
            .iter()
            .all(|k| k.starts_with("kill -9") && !k.contains("postgres")),
        "{killed:?}"
    );
    assert!(
        report.orders_crossing_a_crash() > 0,
        "no order was in flight at a crash: the run proves little"
    );
}

async fn an_effect_applied_twice_fails_the_audit(backend: Backend) {
    let mut config = config(backend, Profile::None, 60);
    config.builtin_faults = false;
    for plant in [Plant::DoubleCharge, Plant::DoubleReserve] {
        config.plant = Some(plant);
        let report = run(&config).await;
        assert!(!report.passed(), "{plant:?} went unnoticed");
        assert!(report.audit.doubled >= 1, "{plant:?}: {:#?}", report.audit);
        assert_eq!(report.audit.lost, 0, "{plant:?}: {:#?}", report.audit);
        if let Some(kept) = &report.kept {
            let _ = std::fs::remove_dir_all(kept);
        }
    }
}

/// The multi-replica profile: three orchestrator replicas on the run's
/// PostgreSQL, each kill of the orchestrator striking one of them in turn,
/// among every other fault of the short profile.
#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_under_the_short_profile_lose_double_and_strand_nothing() {
    let mut config = config(Backend::Postgres, Profile::Short, 1_000);
    config.replicas = 3;
    let report = run(&config).await;
    assert_clean(&config, &report);
}
