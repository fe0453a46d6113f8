//! The saga explorer (`EXPLORER_PORT`): its HTTP API, what it refuses and
//! why, and the page itself in a real browser: Debian's chromium driven by
//! playwright-core (`tests/browser/explorer.mjs`; `npm ci --prefix
//! tests/browser` installs it, `.ci/run` does).

use std::{path::PathBuf, process::Stdio, time::Duration};

use ordersaga_proto::orders::v1::{Order, OrderStatus};
use ordersaga_tests::{
    ADMIN_KEY, API_KEY, Backend, authed,
    binaries::free_port,
    http::{Answer, request},
    system::order,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{assertions::request_id, operator::Setup};

on_both_stores!(
    the_explorer_api_answers_with_a_key_and_names_what_it_refuses,
    in_a_browser_the_explorer_shows_sagas_live_and_resolves_a_stuck_one,
);

struct Explorer {
    setup: Setup,
    addr: std::net::SocketAddr,
}

impl Explorer {
    async fn start(backend: Backend, shipping_latency_ms: u64) -> Explorer {
        let port = free_port();
        let setup = Setup::start_with(
            backend,
            shipping_latency_ms,
            &[
                ("EXPLORER_PORT", port.to_string()),
                ("JAEGER_UI_URL", "http://jaeger.example:16686/".to_owned()),
            ],
        )
        .await;
        Explorer {
            setup,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
        request(self.addr, "GET", path, &headers, None).await
    }

    async fn post(&self, path: &str, key: &str, body: &str) -> Answer {
        request(self.addr, "POST", path, &[("x-api-key", key)], Some(body)).await
    }

    /// An order placed and followed to its end.
    async fn finished(&self, customer: &str, status: OrderStatus) -> Order {
        let placed = self.place(customer).await;
        self.setup.until(&placed.order_id, status).await
    }

    async fn place(&self, customer: &str) -> Order {
        self.setup
            .client()
            .await
            .create_order(authed(order(&request_id(), customer, &[("BOOK", 1)], "DE")))
            .await
            .unwrap()
            .into_inner()
            .order
            .unwrap()
    }
}

/// A refusal: its HTTP status and gRPC code, and its message names `naming`.
fn assert_refused(answer: &Answer, status: u16, code: &str, naming: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    let body = answer.json();
    assert_eq!(body["code"], code, "{answer:?}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains(naming),
        "the message does not name {naming:?}: {answer:?}"
    );
}

fn ids(page: &Value) -> Vec<&str> {
    page["orders"]
        .as_array()
        .map(|orders| {
            orders
                .iter()
                .filter_map(|o| o["orderId"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

async fn the_explorer_api_answers_with_a_key_and_names_what_it_refuses(backend: Backend) {
    let x = Explorer::start(backend, 0).await;

    // The page itself holds no data, and forbids inline script.
    let page = x.get("/", None).await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("Saga explorer"));
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    // No data without a key, nor with a wrong one.
    for path in ["/api/session", "/api/counts", "/api/orders"] {
        let keyless = x.get(path, None).await;
        assert_refused(&keyless, 401, "UNAUTHENTICATED", "x-api-key");
        assert_eq!(keyless.json()["reason"], "API_KEY_MISSING", "{keyless:?}");
        assert_refused(
            &x.get(path, Some("not-a-key")).await,
            401,
            "UNAUTHENTICATED",
            "does not match",
        );
    }
    assert_eq!(
        x.get("/api/session", Some(API_KEY)).await.json()["scope"],
        "read"
    );
    let session = x.get("/api/session", Some(ADMIN_KEY)).await.json();
    assert_eq!(session["scope"], "admin");
    assert_eq!(session["jaegerUrl"], "http://jaeger.example:16686");

    let completed = x.finished("alice", OrderStatus::Completed).await;
    let compensated = x.finished("poor", OrderStatus::Compensated).await;

    let counts = x.get("/api/counts", Some(API_KEY)).await.json();
    assert_eq!(counts["counts"]["COMPLETED"], 1, "{counts}");
    assert_eq!(counts["counts"]["COMPENSATED"], 1, "{counts}");
    assert_eq!(
        counts["counts"]["NEEDS_ATTENTION"], 0,
        "every status is listed: {counts}"
    );

    // The list: by status, by time window, and what it refuses, by name.
    let only = x.get("/api/orders?status=COMPENSATED", Some(API_KEY)).await;
    assert_eq!(
        ids(&only.json()),
        [compensated.order_id.as_str()],
        "{only:?}"
    );
    let both = x
        .get(
            "/api/orders?status=COMPLETED,ORDER_STATUS_COMPENSATED",
            Some(API_KEY),
        )
        .await;
    assert_eq!(ids(&both.json()).len(), 2, "{both:?}");
    let since_yesterday = x
        .get(
            "/api/orders?created_after=2000-01-01T00:00:00Z",
            Some(API_KEY),
        )
        .await;
    assert_eq!(ids(&since_yesterday.json()).len(), 2, "{since_yesterday:?}");
    let future = x
        .get(
            "/api/orders?created_after=2999-01-01T00:00:00Z",
            Some(API_KEY),
        )
        .await;
    assert!(ids(&future.json()).is_empty(), "{future:?}");
    let before_all = x
        .get(
            "/api/orders?created_before=2000-01-01T00:00:00Z",
            Some(API_KEY),
        )
        .await;
    assert!(ids(&before_all.json()).is_empty(), "{before_all:?}");
    for (query, naming) in [
        ("status=SHIPPED", "status"),
        ("colour=red", "colour"),
        ("created_after=yesterday", "created_after"),
        ("page_size=many", "page_size"),
        ("page_size=501", "page_size"),
        ("page_token=garbage", "page_token"),
        (
            "created_after=2026-02-01T00:00:00Z&created_before=2026-01-01T00:00:00Z",
            "created_before",
        ),
    ] {
        let refused = x.get(&format!("/api/orders?{query}"), Some(API_KEY)).await;
        assert_refused(&refused, 400, "INVALID_ARGUMENT", naming);
    }

    // A saga: the order, its pivot, its events, a link to its trace.
    let path = format!("/api/orders/{}", compensated.order_id);
    let detail = x.get(&path, Some(API_KEY)).await.json();
    assert_eq!(
        detail["order"]["status"], "ORDER_STATUS_COMPENSATED",
        "{detail}"
    );
    assert_eq!(detail["saga"]["pivotStep"], "charge_payment");
    assert_eq!(detail["saga"]["pivotPassed"], true);
    let events: Vec<&str> = detail["saga"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["eventType"].as_str())
        .collect();
    assert_eq!(events, ["order.created", "order.compensated"], "{detail}");
    assert_eq!(
        detail["traceUrl"],
        format!("http://jaeger.example:16686/trace/{}", compensated.trace_id)
    );
    assert_refused(
        &x.get("/api/orders/not-an-id", Some(API_KEY)).await,
        400,
        "INVALID_ARGUMENT",
        "order_id",
    );
    assert_refused(
        &x.get(
            &format!("/api/orders/{}", uuid::Uuid::now_v7()),
            Some(API_KEY),
        )
        .await,
        404,
        "NOT_FOUND",
        "not found",
    );

    // Actions: the admin key only; a clear refusal where they make no sense.
    let retry = format!("/api/orders/{}/retry", compensated.order_id);
    let body = format!(r#"{{"request_id": "{}"}}"#, request_id());
    assert_refused(
        &x.post(&retry, API_KEY, &body).await,
        403,
        "PERMISSION_DENIED",
        "admin key",
    );
    assert_refused(
        &x.post(&retry, ADMIN_KEY, "{}").await,
        400,
        "INVALID_ARGUMENT",
        "request_id",
    );
    assert_refused(
        &x.post(&retry, ADMIN_KEY, "not json").await,
        400,
        "INVALID_ARGUMENT",
        "JSON object",
    );
    let resting = x.post(&retry, ADMIN_KEY, &body).await;
    assert_refused(&resting, 409, "FAILED_PRECONDITION", "COMPENSATED");
    // The gRPC refusal's reason comes along (its ErrorInfo).
    assert_eq!(
        resting.json()["reason"],
        "NOT_NEEDING_ATTENTION",
        "{resting:?}"
    );
    let cancel = format!("/api/orders/{}/cancel", completed.order_id);
    assert_refused(
        &x.post(&cancel, ADMIN_KEY, &body).await,
        409,
        "FAILED_PRECONDITION",
        "can no longer be cancelled",
    );
    assert_refused(
        &x.get("/api/nothing-here", Some(API_KEY)).await,
        404,
        "NOT_FOUND",
        "endpoint",
    );
}

/// Where the browser test leaves its screenshots.
fn screenshots(backend: Backend) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/explorer-screenshots")
        .join(format!("{backend:?}").to_lowercase())
}

async fn in_a_browser_the_explorer_shows_sagas_live_and_resolves_a_stuck_one(backend: Backend) {
    // Shipping takes 2.5 s a call: long enough to see a saga run.
    let x = Explorer::start(backend, 2_500).await;
    let compensated = x.finished("poor", OrderStatus::Compensated).await;
    let mut stuck = x.setup.stuck_orders(2).await;
    let (stuck, bulk) = (stuck.remove(0), stuck.remove(0));

    let browser_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser`"
    );
    let mut node = tokio::process::Command::new("node")
        .arg(browser_dir.join("explorer.mjs"))
        .env("EXPLORER_URL", format!("http://{}/", x.addr))
        .env("BUSINESS_KEY", API_KEY)
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("COMPENSATED_ORDER", &compensated.order_id)
        .env("ATTENTION_ORDER", &stuck.order_id)
        .env("BULK_ORDER", &bulk.order_id)
        .env("SCREENSHOTS", screenshots(backend))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (Node.js is on this machine)");
    let mut stdin = node.stdin.take().unwrap();
    let mut stdout = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut said = Vec::new();
    let run = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if line == "NEED_RUNNING_ORDER" {
                // Placed only now, so that it still runs when the page opens.
                let running = x.place("alice").await;
                stdin
                    .write_all(format!("{}\n", running.order_id).as_bytes())
                    .await
                    .unwrap();
            }
            said.push(line);
        }
        node.wait_with_output().await.unwrap()
    };
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the browser test ended within 3 minutes");
    let said = said.join("\n");
    let steps = String::from_utf8_lossy(&output.stderr);
    if !(output.status.success() && said.contains("EXPLORER_OK")) {
        // What the orders were, for the failure's message.
        let orders = x.get("/api/orders", Some(API_KEY)).await.body;
        panic!(
            "the browser test failed ({}); screenshots in {}\n{said}\n{steps}\norders: {orders}",
            output.status,
            screenshots(backend).display()
        );
    }

    // What the page did, seen from the API: retried (the release went
    // through this time), and resolved by hand, kept in its history.
    let retried = x
        .setup
        .until(&bulk.order_id, OrderStatus::Compensated)
        .await;
    assert!(
        !retried.failure_reason.contains("resolved by hand"),
        "{}",
        retried.failure_reason
    );
    let resolved = x
        .setup
        .until(&stuck.order_id, OrderStatus::Compensated)
        .await;
    assert!(
        resolved
            .failure_reason
            .ends_with("resolved by hand by ops@example.com: released the units by hand in the warehouse system"),
        "{}",
        resolved.failure_reason
    );
}
