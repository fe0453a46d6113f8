//! The service binaries as real processes: bad settings stop them with a clear
//! message, and SIGTERM drains and exits cleanly.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use ordersaga_proto::stock::v1::{GetProductRequest, stock_service_client::StockServiceClient};
use ordersaga_tests::{API_KEY, authed, binaries, eventually};

use crate::bins::{ORCHESTRATOR, PAYMENT, SHIPPING, STOCK};

/// Runs `binary` with `env` until it exits; one that is still running after
/// 20 s (it started, where it should have refused to) is killed and reported.
fn run_with_env(binary: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary);
    command
        .current_dir(dir.path())
        .env_clear()
        .env("PORT", "0")
        .env("METRICS_PORT", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("run the binary");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            return (None, format!("{binary} {env:?} kept running"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect its output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A binary, its environment, and what its error must mention.
type BadSetting = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn bad_settings_exit_non_zero_naming_the_setting() {
    let cases: &[BadSetting] = &[
        (STOCK, &[], "APPLICATION_API_KEY"),
        (STOCK, &[("APPLICATION_API_KEY", " ")], "must not be empty"),
        // Keys: long enough, one scope each, a clean list.
        (
            STOCK,
            &[("APPLICATION_API_KEY", "short-secret-key")],
            "needs at least 32",
        ),
        (
            PAYMENT,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("ADMIN_API_KEY", "admin-short-secret"),
            ],
            "ADMIN_API_KEY",
        ),
        (
            STOCK,
            &[
                (
                    "APPLICATION_API_KEY",
                    "dev-key,abcdefghijklmnopqrstuvwxyz0123456789",
                ),
                ("ADMIN_API_KEY", "abcdefghijklmnopqrstuvwxyz0123456789"),
            ],
            "share a key",
        ),
        (
            SHIPPING,
            &[("APPLICATION_API_KEY", "dev-key,")],
            "stray comma",
        ),
        (
            ORCHESTRATOR,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("SERVICES_API_KEY", "dev-key,dev-key"),
            ],
            "one key only",
        ),
        (
            PAYMENT,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("FAULT_UNAVAILABLE_RATE", "1.5"),
            ],
            "fault-unavailable-rate",
        ),
        (
            SHIPPING,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("SHIP_TO_COUNTRIES", "DE,germany"),
            ],
            "ship-to-countries",
        ),
        // A durability that is not one of the two: named, with the choices.
        (
            STOCK,
            &[("APPLICATION_API_KEY", "dev-key"), ("DURABILITY", "fast")],
            "invalid value 'fast' for '--durability <DURABILITY>'",
        ),
        (
            ORCHESTRATOR,
            &[("APPLICATION_API_KEY", "dev-key"), ("DURABILITY", "off")],
            "[possible values: full, relaxed]",
        ),
        // Settings that break a service on purpose need an explicit opt-in.
        (
            SHIPPING,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("FAULT_DROP_REPLY_RATE", "0.1"),
            ],
            "ALLOW_UNSAFE_SETTINGS",
        ),
        (
            ORCHESTRATOR,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("BENCH_ONLY_IN_MEMORY_STORE", "true"),
            ],
            "ALLOW_UNSAFE_SETTINGS",
        ),
        // TLS: both halves of an identity, readable PEM files, and URLs
        // that say what the orchestrator's TLS settings say.
        (
            STOCK,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("TLS_CERT", "/nonexistent/server.pem"),
            ],
            "TLS_CERT is set without TLS_KEY",
        ),
        (
            PAYMENT,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("TLS_CERT", "/nonexistent/server.pem"),
                ("TLS_KEY", "/nonexistent/server-key.pem"),
            ],
            "TLS_CERT: cannot read /nonexistent/server.pem",
        ),
        (
            SHIPPING,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("TLS_CLIENT_CA", "/nonexistent/ca.pem"),
            ],
            "TLS_CLIENT_CA needs TLS_CERT and TLS_KEY",
        ),
        (
            ORCHESTRATOR,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("STOCK_SERVICE_URL", "https://localhost:50052"),
            ],
            "SERVICES_TLS_CA is not set",
        ),
        (
            ORCHESTRATOR,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("SERVICES_TLS_CA", "/nonexistent/ca.pem"),
            ],
            "SERVICES_TLS_CA: cannot read /nonexistent/ca.pem",
        ),
        // TLS to the backends: files readable, and only with a TLS URL.
        (
            STOCK,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                (
                    "DATABASE_URL",
                    "postgres://postgres@127.0.0.1/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
                ),
            ],
            "sslrootcert=/nonexistent/ca.pem cannot be read",
        ),
        (
            ORCHESTRATOR,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("RABBITMQ_HOST", "127.0.0.1"),
                ("RABBITMQ_TLS_CA", "/nonexistent/ca.pem"),
            ],
            "the broker is not reached over TLS",
        ),
        (
            ORCHESTRATOR,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("RABBITMQ_HOST", "127.0.0.1"),
                ("RABBITMQ_TLS", "true"),
                ("RABBITMQ_TLS_CA", "/nonexistent/ca.pem"),
            ],
            "RABBITMQ_TLS_CA: cannot read /nonexistent/ca.pem",
        ),
        (
            ORCHESTRATOR,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("RABBITMQ_URL", "amqps://guest:hunter2@127.0.0.1:5671/%2f"),
                ("RABBITMQ_TLS_CERT", "/nonexistent/client.pem"),
            ],
            "RABBITMQ_TLS_CERT and RABBITMQ_TLS_KEY go together",
        ),
        (
            STOCK,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://localhost:4317"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
            ],
            "OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read /nonexistent/ca.pem",
        ),
        (
            PAYMENT,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem"),
            ],
            "OTEL_EXPORTER_OTLP_ENDPOINT is not an https:// URL",
        ),
        (
            STOCK,
            &[("APPLICATION_API_KEY", "dev-key"), ("PORT", "99999")],
            "port",
        ),
        (
            STOCK,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("DATABASE_URL", "mysql://x"),
            ],
            "DATABASE_URL",
        ),
        (
            STOCK,
            &[
                ("APPLICATION_API_KEY", "dev-key"),
                ("DATABASE_URL", "postgres://nobody:hunter2@127.0.0.1:1/x"),
            ],
            "cannot open the store",
        ),
    ];
    for (binary, env, needle) in cases {
        let (code, stderr) = run_with_env(binary, env);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{binary} {env:?} should fail, exited {code:?}: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{binary} {env:?}: stderr should mention {needle:?}:\n{stderr}"
        );
        for secret in [
            "hunter2",
            "short-secret-key",
            "admin-short-secret",
            "abcdefghijklm",
        ] {
            assert!(
                !stderr.contains(secret),
                "a secret reached the output:\n{stderr}"
            );
        }
    }
}

/// Also checks the logs: JSON lines with `LOG_JSON`, and no secret in them,
/// even at the most verbose level.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = binaries::free_port();
    let child = tokio::process::Command::new(STOCK)
        .current_dir(dir.path())
        .env("APPLICATION_API_KEY", API_KEY)
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .env("METRICS_PORT", "0")
        .env("LOG_JSON", "true")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start stock-svc");

    let endpoint = format!("http://127.0.0.1:{port}");
    let mut client = eventually("stock-svc to accept calls", Duration::from_secs(20), || {
        let endpoint = endpoint.clone();
        async move { StockServiceClient::connect(endpoint).await.ok() }
    })
    .await;
    let answer = client
        .get_product(authed(GetProductRequest { sku: "NONE".into() }))
        .await;
    assert_eq!(answer.unwrap_err().code(), tonic::Code::NotFound);
    assert!(
        dir.path().join("data/stock.db").exists(),
        "the default store is a SQLite file under ./data"
    );

    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(
        output.status.success(),
        "exit status after SIGTERM: {:?}",
        output.status
    );

    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(logs.contains("SIGTERM received"), "{logs}");
    for line in logs.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON log line: {line}"
        );
        assert!(
            !line.contains(API_KEY),
            "the API key reached the logs: {line}"
        );
    }
}
