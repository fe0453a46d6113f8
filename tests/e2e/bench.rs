//! The orderbench smoke: 200 orders through the real system must conserve
//! stock and money and end as their customers dictate. It asserts no time:
//! speed is the benchmark's business (docs/benchmarks.md).

use std::collections::BTreeMap;

use orderbench::{BenchConfig, check, run, setup};
use ordersaga_tests::{
    ADMIN_KEY, API_KEY, Backend,
    system::{Options, System},
};

on_both_stores!(orderbench_smoke_conserves_stock_and_money);

async fn orderbench_smoke_conserves_stock_and_money(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let config = BenchConfig {
        orders_addr: system.orchestrator.endpoint(),
        stock_addr: system.services.stock.endpoint(),
        payment_addr: system.services.payment.endpoint(),
        api_key: API_KEY.to_owned(),
        admin_key: ADMIN_KEY.to_owned(),
        orders: 200,
        concurrency: 16,
        compensate_share: 0.1,
        progress: false,
    };
    let world = setup::prepare(&config).await.unwrap();
    let load = run::orders(&config, &world).await.unwrap();
    let verdict = check::conservation(&config, &world, &load).await.unwrap();
    assert!(verdict.passed(), "{:?}\n{load:?}", verdict.failures);
    assert_eq!(load.outcomes.get("COMPLETED"), Some(&180));
    assert_eq!(load.outcomes.get("COMPENSATED"), Some(&20));
    // Each outcome's latencies are its own orders'.
    let counted: BTreeMap<&str, u64> = load
        .latency_by_outcome
        .iter()
        .map(|(status, latency)| (status.as_str(), latency.len()))
        .collect();
    assert_eq!(
        counted,
        BTreeMap::from([("COMPENSATED", 20), ("COMPLETED", 180)])
    );
    assert!(load.errors.is_empty(), "{:?}", load.errors);
}

/// The overload mode, run small: with room for 4 sagas driven and 4 waiting,
/// orders offered at 10 times the sustained rate are partly admitted and
/// partly refused RESOURCE_EXHAUSTED, and nothing fails otherwise. (What the
/// latencies are is the benchmark's business.)
#[tokio::test(flavor = "multi_thread")]
async fn orderbench_overload_admits_some_and_refuses_the_rest() {
    let options = Options {
        engine: Some(orchestrator::EngineArgs {
            max_inflight_sagas: 4,
            max_waiting_sagas: 4,
            ..Default::default()
        }),
        ..Options::default()
    };
    let system = System::start(Backend::Sqlite, options).await;
    let config = BenchConfig {
        orders_addr: system.orchestrator.endpoint(),
        stock_addr: system.services.stock.endpoint(),
        payment_addr: system.services.payment.endpoint(),
        api_key: API_KEY.to_owned(),
        admin_key: ADMIN_KEY.to_owned(),
        orders: 40,
        concurrency: 4,
        compensate_share: 0.0,
        progress: false,
    };
    let report = orderbench::overload::run(
        &config,
        orderbench::overload::Offer::Factor(10.0),
        2,
        &[orderbench::cpu::Target::Own("(orderbench)")],
    )
    .await
    .unwrap();
    report.print();
    assert!(report.admitted > 0, "{report:?}");
    assert!(report.refused > 0, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    // The generator's own CPU while it offered the load is accounted.
    assert!(
        report
            .cpu_cores
            .get("(orderbench)")
            .is_some_and(|cores| *cores > 0.0),
        "{report:?}"
    );
    assert_eq!(report.admitted + report.refused, report.offered);
}
