//! Crash recovery: the orchestrator is a real process, killed with SIGKILL
//! (`kill -9`) while sagas are in flight, at several points, and restarted on
//! the same store. Every saga must finish as its inputs dictate, with no effect
//! doubled.

use std::{process::Stdio, time::Duration};

use ordersaga_proto::{client::OrderClient, orders::v1::OrderStatus};
use ordersaga_tests::{
    API_KEY, Backend, TestDb, binaries, eventually,
    system::{DomainServices, Options, order},
};
use svc_kit::fault::FaultSettings;
use tokio::process::{Child, Command};

use crate::assertions::request_id;

on_both_stores!(kill_9_mid_saga_then_every_saga_finishes_once);

struct OrchestratorProcess {
    port: u16,
    db_url: String,
    services: (String, String, String),
}

impl OrchestratorProcess {
    fn spawn(&self) -> Child {
        Command::new(crate::bins::ORCHESTRATOR)
            .env_clear()
            .env("APPLICATION_API_KEY", API_KEY)
            .env("HOST", "127.0.0.1")
            .env("PORT", self.port.to_string())
            .env("METRICS_PORT", "0")
            .env("DATABASE_URL", &self.db_url)
            .env("STOCK_SERVICE_URL", &self.services.0)
            .env("SHIPPING_SERVICE_URL", &self.services.1)
            .env("PAYMENT_SERVICE_URL", &self.services.2)
            .env("RETRY_INITIAL_BACKOFF_MS", "5")
            .env("RETRY_MAX_BACKOFF_MS", "100")
            .env("STEP_MAX_ATTEMPTS", "40")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the orchestrator")
    }

    async fn client(&self) -> OrderClient {
        let endpoint = format!("http://127.0.0.1:{}", self.port);
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
}

async fn open_sagas(db: &TestDb) -> i64 {
    let pool = db.pool().await;
    sqlx::query_scalar("SELECT COUNT(*) FROM sagas WHERE status IN ('RUNNING', 'COMPENSATING')")
        .fetch_one(&pool)
        .await
        .unwrap()
}

async fn kill_9_mid_saga_then_every_saga_finishes_once(backend: Backend) {
    // Slow services keep sagas in flight; dropped replies add unknown outcomes.
    let faults = FaultSettings {
        fault_latency_ms: 400,
        fault_drop_reply_rate: 0.1,
        ..Default::default()
    };
    let services = DomainServices::start(backend, &Options::faults_everywhere(faults)).await;
    let db = TestDb::new(backend).await;
    let process = OrchestratorProcess {
        port: binaries::free_port(),
        db_url: db.url.clone(),
        services: (
            services.stock.endpoint(),
            services.shipping.endpoint(),
            services.payment.endpoint(),
        ),
    };
    let mut child = process.spawn();
    let client = process.client().await;

    let orders: Vec<(String, &str, &str)> = (0..40)
        .map(|i| {
            let customer = if i % 5 == 0 { "poor" } else { "alice" };
            let country = if i % 13 == 1 { "AQ" } else { "DE" };
            (request_id(), customer, country)
        })
        .collect();
    let creates = orders.iter().map(|(rid, customer, country)| {
        let client = client.clone();
        let request = order(rid, customer, &[("BOOK", 1)], country);
        async move { client.create_order(request).await.expect("create").order_id }
    });
    let ids: Vec<String> = futures::future::join_all(creates).await;

    // Kill at several points of the sagas' lives: early (first steps in
    // flight), later (last steps and compensations), and right after a recovery.
    for delay_ms in [300, 900, 150] {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        child.kill().await.expect("kill -9 the orchestrator");
        let open = open_sagas(&db).await;
        assert!(
            open > 0,
            "the kill after {delay_ms} ms should find sagas in flight"
        );
        child = process.spawn();
        process.client().await;
    }

    let client = process.client().await;
    let finished = eventually("every saga to finish", Duration::from_secs(120), || {
        let client = client.clone();
        let ids = ids.clone();
        async move {
            let mut finished = Vec::new();
            for id in &ids {
                let order = client.get_order(id).await.ok()?;
                let status = OrderStatus::try_from(order.status).ok()?;
                if matches!(status, OrderStatus::Running | OrderStatus::Compensating) {
                    return None;
                }
                finished.push(order);
            }
            Some(finished)
        }
    })
    .await;

    let mut completed = 0;
    for (order, (_, customer, country)) in finished.iter().zip(&orders) {
        let expected = if *country == "AQ" || *customer == "poor" {
            OrderStatus::Compensated
        } else {
            OrderStatus::Completed
        };
        assert_eq!(
            OrderStatus::try_from(order.status).unwrap(),
            expected,
            "{order:?}"
        );
        if expected == OrderStatus::Completed {
            completed += 1;
        }
    }
    let effects = services.effects().await;
    assert_eq!(effects.reserved, completed, "{effects:?}");
    assert_eq!(effects.shipments_prepared, completed, "{effects:?}");
    assert_eq!(effects.charged, completed, "{effects:?}");
    assert_eq!(effects.refunded, 0, "{effects:?}");
    assert_eq!(effects.products["BOOK"].1, completed, "{effects:?}");
    effects.assert_conserved();
    child.kill().await.ok();
}
