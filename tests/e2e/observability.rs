//! Tracing end to end: the four services run as real processes, each exporting
//! over OTLP to an in-process collector under its own `service.name` (and, in
//! one test, exporting nothing: spans still carry their trace IDs).

use std::{collections::BTreeSet, path::Path, time::Duration};

use ordersaga_proto::{
    client::OrderClient,
    orders::v1::{Order, OrderStatus, StepStatus, order_service_client::OrderServiceClient},
    stock::v1::{RestockRequest, stock_service_client::StockServiceClient},
};
use ordersaga_tests::{
    API_KEY, admin,
    collector::{CollectedSpan, Collector},
    eventually,
    pki::Pki,
    process::ServiceProcess,
    system::{order, seed},
};
use tonic::{Request, transport::Channel};

use crate::{assertions::request_id, bins};

const SERVICES: [&str; 4] = ["orchestrator", "stock-svc", "shipping-svc", "payment-svc"];

struct Deployment {
    stock: ServiceProcess,
    shipping: ServiceProcess,
    payment: ServiceProcess,
    orchestrator: ServiceProcess,
}

/// What makes a process export its spans to `collector`.
fn exporting_to(collector: &Collector) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
        // Export every 100 ms rather than every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

impl Deployment {
    /// The four processes, each with `otel` (see [`exporting_to`]; empty:
    /// nothing exports), shipping with `shipping_env` too and its log lines
    /// in `dir/shipping.out`.
    async fn start(
        dir: &Path,
        otel: &[(&'static str, String)],
        shipping_env: &[(&'static str, String)],
    ) -> Deployment {
        let with = |extra: &[(&'static str, String)]| [otel, extra].concat();
        let mut stock = ServiceProcess::new(bins::STOCK, dir, "stock", otel);
        let mut shipping =
            ServiceProcess::new(bins::SHIPPING, dir, "shipping", &with(shipping_env));
        shipping.log_to(&dir.join("shipping.out"));
        let mut payment = ServiceProcess::new(bins::PAYMENT, dir, "payment", otel);
        stock.start().await;
        shipping.start().await;
        payment.start().await;
        seed(&stock.endpoint(), &payment.endpoint()).await;
        let mut orchestrator = ServiceProcess::new(
            bins::ORCHESTRATOR,
            dir,
            "orchestrator",
            &with(&[
                ("STOCK_SERVICE_URL", stock.endpoint()),
                ("SHIPPING_SERVICE_URL", shipping.endpoint()),
                ("PAYMENT_SERVICE_URL", payment.endpoint()),
                ("STEP_MAX_ATTEMPTS", "40".into()),
                ("RETRY_INITIAL_BACKOFF_MS", "5".into()),
                ("RETRY_MAX_BACKOFF_MS", "50".into()),
                ("COMPENSATION_MAX_BACKOFF_MS", "50".into()),
            ]),
        );
        orchestrator.start().await;
        Deployment {
            stock,
            shipping,
            payment,
            orchestrator,
        }
    }

    async fn client(&self) -> OrderClient {
        OrderClient::connect(self.orchestrator.endpoint(), API_KEY)
            .await
            .unwrap()
    }

    /// SIGTERM everywhere: each process flushes its spans on the way out.
    async fn stop(mut self) {
        self.orchestrator.terminate().await;
        self.stock.terminate().await;
        self.shipping.terminate().await;
        self.payment.terminate().await;
    }
}

/// An order of one book for alice, placed with `traceparent` in its
/// metadata, once it has ended.
async fn placed_in_trace(raw: &mut OrderServiceClient<Channel>, traceparent: &str) -> Order {
    let mut request = Request::new(order(&request_id(), "alice", &[("BOOK", 1)], "DE"));
    request.get_mut().wait = true;
    request
        .metadata_mut()
        .insert("x-api-key", API_KEY.parse().unwrap());
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    raw.create_order(request)
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap()
}

fn attempts<'a>(trace: &'a [CollectedSpan], step: &str, phase: &str) -> Vec<&'a CollectedSpan> {
    trace
        .iter()
        .filter(|s| s.attr("step") == Some(step) && s.attr("phase") == Some(phase))
        .collect()
}

async fn wait_terminal(client: &OrderClient, order_id: &str) -> Order {
    eventually("the order to finish", Duration::from_secs(60), || async {
        let order = client.get_order(order_id).await.ok()?;
        let status = OrderStatus::try_from(order.status).ok()?;
        (!matches!(status, OrderStatus::Running | OrderStatus::Compensating)).then_some(order)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_order_is_one_trace_across_all_four_services() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Half of the shipping calls fail before any work: steps get retried.
    let faults = [
        ("FAULT_UNAVAILABLE_RATE", "0.5".to_owned()),
        ("ALLOW_UNSAFE_SETTINGS", "true".to_owned()),
    ];
    let deployment = Deployment::start(dir.path(), &exporting_to(&collector), &faults).await;

    // The client's own trace roots the saga.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut raw = OrderServiceClient::connect(deployment.orchestrator.endpoint())
        .await
        .unwrap();
    let traced = placed_in_trace(&mut raw, &format!("00-{client_trace}-{client_span}-01")).await;
    assert_eq!(traced.status, OrderStatus::Completed as i32);
    assert_eq!(
        traced.trace_id, client_trace,
        "Order.trace_id is the saga's trace"
    );

    // More orders, some compensated (customer "poor" can't pay), until one of
    // them shows a retried step.
    let client = deployment.client().await;
    let mut orders = Vec::new();
    for i in 0..12 {
        let customer = if i % 3 == 0 { "poor" } else { "alice" };
        let mut request = order(&request_id(), customer, &[("PEN", 1)], "DE");
        request.wait = true;
        orders.push(client.create_order(request).await.unwrap());
    }
    assert!(
        orders.iter().flat_map(|o| &o.steps).any(|s| s.attempts > 1),
        "50% shipping failures should force retries"
    );
    deployment.stop().await;

    // All four services, one trace, rooted in the client's span.
    let trace = collector.trace(client_trace);
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(services, BTreeSet::from(SERVICES), "{trace:#?}");
    let create = trace
        .iter()
        .find(|s| s.name == "orders.v1.OrderService/CreateOrder")
        .expect("the CreateOrder server span");
    assert_eq!(create.parent_span_id, client_span);

    // Each domain server span is the child of an attempt span of the orchestrator.
    for (step, method) in [
        ("reserve_stock", "stock.v1.StockService/ReserveStock"),
        (
            "prepare_shipment",
            "shipping.v1.ShippingService/PrepareShipment",
        ),
        ("charge_payment", "payment.v1.PaymentService/Charge"),
    ] {
        let servers: Vec<_> = trace.iter().filter(|s| s.name == method).collect();
        assert!(!servers.is_empty(), "no server span for {method}");
        let attempt_spans = attempts(&trace, step, "forward");
        for server in servers {
            let parent = attempt_spans
                .iter()
                .find(|a| a.span_id == server.parent_span_id)
                .unwrap_or_else(|| {
                    panic!("{method}'s server span is not a child of a {step} attempt")
                });
            assert_eq!(parent.service, "orchestrator");
            assert_eq!(
                parent.attr("request_id").unwrap(),
                format!("{}:{step}:forward", traced.order_id)
            );
            assert!(parent.attr("attempt").is_some() && parent.attr("saga_id").is_some());
        }
    }

    // A retried step shows several attempts in its order's trace; failed ones are errors.
    let retried = orders
        .iter()
        .find(|o| {
            o.steps
                .iter()
                .any(|s| s.name == "prepare_shipment" && s.attempts > 1 && s.phase == 1)
        })
        .or_else(|| {
            orders
                .iter()
                .find(|o| o.steps.iter().any(|s| s.attempts > 1))
        })
        .expect("an order with a retried step");
    let retried_trace = collector.trace(&retried.trace_id);
    let step = retried.steps.iter().find(|s| s.attempts > 1).unwrap();
    let phase = if step.phase == 1 {
        "forward"
    } else {
        "compensation"
    };
    let step_attempts = attempts(&retried_trace, &step.name, phase);
    assert_eq!(
        step_attempts.len(),
        step.attempts as usize,
        "{step:?}: {step_attempts:#?}"
    );
    assert!(
        step_attempts.iter().filter(|a| a.error).count() >= 1,
        "{step_attempts:#?}"
    );

    // A compensated order shows its compensation spans, in the services too.
    let compensated = orders
        .iter()
        .find(|o| o.status == OrderStatus::Compensated as i32)
        .expect("a compensated order");
    let trace = collector.trace(&compensated.trace_id);
    for step in ["prepare_shipment", "reserve_stock"] {
        let done = attempts(&trace, step, "compensation");
        assert!(!done.is_empty(), "no {step} compensation span");
    }
    assert!(
        trace
            .iter()
            .any(|s| s.name == "stock.v1.StockService/ReleaseStock" && s.service == "stock-svc")
    );
    assert!(
        trace
            .iter()
            .any(|s| s.name == "shipping.v1.ShippingService/CancelShipment"
                && s.service == "shipping-svc")
    );
    let failed_charge = attempts(&trace, "charge_payment", "forward");
    assert!(
        failed_charge.iter().all(|a| a.error),
        "the refused charge is recorded as an error"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_resumed_after_kill_9_join_the_original_trace() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Slow shipping: the saga is caught mid-flight.
    let slow = [
        ("FAULT_LATENCY_MS", "1500".to_owned()),
        ("ALLOW_UNSAFE_SETTINGS", "true".to_owned()),
    ];
    let mut deployment = Deployment::start(dir.path(), &exporting_to(&collector), &slow).await;
    let client = deployment.client().await;
    let created = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    let trace_id = created.trace_id.clone();
    assert_eq!(trace_id.len(), 32);
    eventually(
        "the stock to be reserved",
        Duration::from_secs(20),
        || async {
            let order = client.get_order(&created.order_id).await.ok()?;
            order
                .steps
                .iter()
                .any(|s| s.name == "reserve_stock" && s.status == StepStatus::Succeeded as i32)
                .then_some(())
        },
    )
    .await;

    deployment.orchestrator.kill().await;
    deployment.orchestrator.start().await;
    let client = deployment.client().await;
    let finished = wait_terminal(&client, &created.order_id).await;
    assert_eq!(finished.status, OrderStatus::Completed as i32);
    assert_eq!(finished.trace_id, trace_id);
    deployment.stop().await;

    let trace = collector.trace(&trace_id);
    let resumed = trace
        .iter()
        .find(|s| s.name == "order saga" && s.attr("resumed") == Some("true"))
        .expect("the resumed saga's span is in the original trace");
    assert_eq!(resumed.service, "orchestrator");
    let charge = attempts(&trace, "charge_payment", "forward");
    assert!(
        !charge.is_empty(),
        "the step after the crash joined the original trace"
    );
    assert!(
        trace
            .iter()
            .any(|s| s.name == "payment.v1.PaymentService/Charge" && s.service == "payment-svc")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_over_tls_only_to_a_trusted_collector() {
    let pki = Pki::new();
    let tls = svc_kit::tls::TlsArgs {
        tls_client_ca: None,
        ..pki.server_mtls()
    }
    .server_config()
    .unwrap()
    .expect("a TLS configuration");
    let collector = Collector::start_tls(tls).await;
    let dir = tempfile::tempdir().unwrap();
    let exporting_to = |name: &str, ca: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.https_endpoint()),
            (
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                pki.path(ca).display().to_string(),
            ),
            ("OTEL_SERVICE_NAME", name.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let mut untrusting = ServiceProcess::new(
        bins::STOCK,
        dir.path(),
        "untrusting",
        &exporting_to("stock-untrusting", "other-ca.pem"),
    );
    let mut trusting = ServiceProcess::new(
        bins::STOCK,
        dir.path(),
        "trusting",
        &exporting_to("stock-trusting", "ca.pem"),
    );
    untrusting.start().await;
    trusting.start().await;
    for service in [&untrusting, &trusting] {
        StockServiceClient::connect(service.endpoint())
            .await
            .unwrap()
            .restock(admin(RestockRequest {
                request_id: request_id(),
                sku: "BOOK".into(),
                quantity: 1,
                name: "Book".into(),
                unit_price_cents: 1_500,
                currency: "EUR".into(),
            }))
            .await
            .expect("a traced call");
    }
    eventually("spans over TLS", Duration::from_secs(30), || async {
        collector
            .spans()
            .iter()
            .any(|s| s.service == "stock-trusting")
            .then_some(())
    })
    .await;
    // Both made spans at the same time and export every 100 ms.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !collector
            .spans()
            .iter()
            .any(|s| s.service == "stock-untrusting"),
        "spans went to a collector whose certificate another CA signed"
    );
    untrusting.terminate().await;
    trusting.terminate().await;
}

/// Nothing exports: spans still get W3C IDs (`trace_ids`), so an order keeps
/// its caller's trace, and shipping's log line from one of the order's calls
/// names that trace: the context crossed the process boundary.
#[tokio::test(flavor = "multi_thread")]
async fn without_an_exporter_the_callers_trace_reaches_the_order_and_a_service() {
    let dir = tempfile::tempdir().unwrap();
    // Half of the shipping calls fail before any work (steps are retried),
    // and each failure says so at debug level, inside the call's span (which
    // the log line shows, with its trace ID, when its INFO level is logged).
    let faults = [
        ("FAULT_UNAVAILABLE_RATE", "0.5".to_owned()),
        ("ALLOW_UNSAFE_SETTINGS", "true".to_owned()),
        ("RUST_LOG", "info,svc_kit::fault=debug".to_owned()),
    ];
    let deployment = Deployment::start(dir.path(), &[], &faults).await;
    let shipping_log = dir.path().join("shipping.out");
    let client = deployment.client().await;
    let mut raw = OrderServiceClient::connect(deployment.orchestrator.endpoint())
        .await
        .unwrap();

    // Orders in the caller's trace, until a failed shipping call of one of
    // them shows in the log (each has even odds; 40 without is 2^-40).
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let in_callers_trace = |log: &str| {
        log.lines()
            .any(|line| line.contains("fault injected") && line.contains(client_trace))
    };
    let mut log = String::new();
    for _ in 0..40 {
        let placed =
            placed_in_trace(&mut raw, &format!("00-{client_trace}-00f067aa0ba902b7-01")).await;
        assert_eq!(placed.status, OrderStatus::Completed as i32);
        assert_eq!(
            placed.trace_id, client_trace,
            "Order.trace_id is the caller's trace"
        );
        log = std::fs::read_to_string(&shipping_log).unwrap();
        if in_callers_trace(&log) {
            break;
        }
    }
    assert!(
        in_callers_trace(&log),
        "a shipping call was in the caller's trace:\n{log}"
    );

    // An order placed with no trace of its own starts one.
    let started = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    assert_eq!(started.trace_id.len(), 32);
    assert_ne!(started.trace_id, client_trace);
    deployment.stop().await;
}
