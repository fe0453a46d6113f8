//! The generated SDKs, used as their users would, against the real running
//! system: `sdks/python` (grpcio; `pip install -r sdks/python/requirements.txt`)
//! and `sdks/typescript` (Connect for Node; `npm ci --prefix sdks/typescript`)
//! each create and wait, replay, get, list, watch, cancel, and read a
//! refusal. Not store-dependent (an SDK is a client): SQLite only.

use std::time::Duration;

use ordersaga_tests::{API_KEY, Backend};

use crate::operator::Setup;

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_creates_gets_lists_watches_cancels_and_reads_a_refusal() {
    // Shipping takes a second a call, so an order can be cancelled before payment.
    let setup = Setup::start(Backend::Sqlite).await;
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdks/python/tests/e2e.py");
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .env(
            "ORDERS_ADDR",
            format!("127.0.0.1:{}", setup.orchestrator.port),
        )
        .env("API_KEY", API_KEY)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the Python SDK's test ended within 2 minutes")
        .expect("python3 runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.contains("PYTHON_SDK_OK"),
        "the Python SDK's test failed (is grpcio installed? pip install -r sdks/python/requirements.txt):\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_typescript_sdk_creates_gets_lists_watches_cancels_and_reads_a_refusal() {
    let sdk = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdks/typescript");
    assert!(
        sdk.join("node_modules/.bin/tsc").exists(),
        "the TypeScript SDK's packages are not installed: run `npm ci --prefix sdks/typescript`"
    );
    let built = tokio::process::Command::new(sdk.join("node_modules/.bin/tsc"))
        .args(["-p", "."])
        .current_dir(&sdk)
        .output()
        .await
        .expect("tsc runs");
    assert!(
        built.status.success(),
        "the TypeScript SDK does not compile: {}",
        String::from_utf8_lossy(&built.stdout)
    );
    let setup = Setup::start(Backend::Sqlite).await;
    let run = tokio::process::Command::new("node")
        .arg("dist/tests/e2e.js")
        .current_dir(&sdk)
        .env("ORDERS_URL", setup.orchestrator.endpoint())
        .env("API_KEY", API_KEY)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the TypeScript SDK's test ended within 2 minutes")
        .expect("node runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.contains("TYPESCRIPT_SDK_OK"),
        "the TypeScript SDK's test failed:\n{said}"
    );
}
