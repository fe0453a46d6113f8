//! The orderbench smoke: 200 orders through the real system must conserve
//! stock and money and end as their customers dictate. It asserts no time:
//! speed is the benchmark's business (docs/benchmarks.md).

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
    assert!(load.errors.is_empty(), "{:?}", load.errors);
}
