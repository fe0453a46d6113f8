//! Orchestrator replicas: several processes on one PostgreSQL database share
//! the open sagas through leases with epochs; on SQLite, one process only.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::Stdio,
    time::{Duration, Instant},
};

use ordersaga_proto::{client::OrderClient, orders::v1::OrderStatus};
use ordersaga_tests::{
    API_KEY, Backend, TestDb,
    broker::{collect_until, consume, rabbitmq_url, unique_exchange},
    eventually,
    process::{ServiceProcess, orchestrator_process},
    system::{DomainServices, Options, order},
};
use sqlx::AnyPool;
use svc_kit::fault::FaultSettings;
use tokio::task::JoinHandle;

use crate::{assertions::request_id, bins};

/// A second orchestrator on a SQLite file another one uses refuses to start,
/// naming the file and what to use instead.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_orchestrator_on_one_sqlite_file_refuses_to_start() {
    let services = DomainServices::start(Backend::Sqlite, &Options::default()).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &[]);
    first.start().await;
    first.order_client().await;

    let second = orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &[]);
    let mut command = tokio::process::Command::new(bins::ORCHESTRATOR);
    command
        .env_clear()
        .envs(second.env().iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap();
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the second orchestrator on the same SQLite file kept running")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "it exited with {:?}",
        output.status
    );
    let file = db.url.trim_start_matches("sqlite://");
    let file = file.split('?').next().unwrap();
    assert!(
        stderr.contains(file) && stderr.contains("PostgreSQL"),
        "the refusal must name the file ({file}) and say what to use instead: {stderr}"
    );
    // The first one is unharmed.
    first.order_client().await;
}

/// The lease of the replicas in the takeover tests.
const LEASE_MS: u64 = 1_000;

/// N orchestrator replicas on one PostgreSQL database, the domain services
/// behind them slowed so that sagas are in flight when a replica goes.
struct Cluster {
    services: DomainServices,
    db: TestDb,
    replicas: Vec<ServiceProcess>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(n: usize, lease_ms: u64, latency_ms: u64, exchange: Option<&str>) -> Cluster {
        let faults = FaultSettings {
            fault_latency_ms: latency_ms,
            ..Default::default()
        };
        let services =
            DomainServices::start(Backend::Postgres, &Options::faults_everywhere(faults)).await;
        let db = TestDb::new(Backend::Postgres).await;
        let dir = tempfile::tempdir().unwrap();
        let mut replicas = vec![];
        for i in 0..n {
            let mut env = vec![
                ("REPLICA_ID", format!("r{i}")),
                ("LEASE_MS", lease_ms.to_string()),
            ];
            if let Some(exchange) = exchange {
                env.push(("RABBITMQ_URL", rabbitmq_url()));
                env.push(("EVENTS_EXCHANGE", exchange.to_owned()));
            }
            let mut replica =
                orchestrator_process(bins::ORCHESTRATOR, dir.path(), &db.url, &services, &env);
            replica.start().await;
            replica.order_client().await;
            replicas.push(replica);
        }
        Cluster {
            services,
            db,
            replicas,
            _dir: dir,
        }
    }

    fn clients(&self) -> Vec<OrderClient> {
        self.replicas
            .iter()
            .map(|r| {
                let channel = tonic::transport::Endpoint::from_shared(r.endpoint())
                    .unwrap()
                    .connect_timeout(Duration::from_millis(500))
                    .connect_lazy();
                OrderClient::from_channel(channel, API_KEY)
            })
            .collect()
    }

    /// The open sagas `replica` owns.
    async fn open_sagas_of(&self, replica: usize) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT saga_id FROM sagas WHERE owner = $1 AND status IN ('RUNNING', 'COMPENSATING')",
        )
        .bind(format!("r{replica}"))
        .fetch_all(&self.db.pool().await)
        .await
        .unwrap()
    }

    /// How many of `sagas` are still open and owned by `replica`.
    async fn still_owned(&self, replica: usize, sagas: &[String]) -> usize {
        let owned = self.open_sagas_of(replica).await;
        sagas.iter().filter(|s| owned.contains(s)).count()
    }

    /// Whether any of `sagas` has a step record written after a takeover.
    async fn checkpointed_by_new_owner(&self, sagas: &[String]) -> bool {
        let epochs: Vec<(String, i64)> =
            sqlx::query_as("SELECT saga_id, epoch FROM saga_steps WHERE epoch > 1")
                .fetch_all(&self.db.pool().await)
                .await
                .unwrap();
        epochs.iter().any(|(saga, _)| sagas.contains(saga))
    }

    /// The replica whose relay publishes the outbox now.
    async fn relay_leader(&self) -> Option<usize> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()",
        )
        .fetch_all(&self.db.pool().await)
        .await
        .unwrap();
        (0..self.replicas.len()).find(|i| {
            names.contains(&orchestrator::outbox::leader::session_name(&format!(
                "r{i}"
            )))
        })
    }
}

/// One order placed by the load: its request, its customer and its ID.
#[derive(Debug, Clone)]
struct Placed {
    request_id: String,
    poor: bool,
    order_id: String,
}

/// Places `n` orders, one every `every`, round-robin over the replicas; a
/// call that fails or hangs is retried with the same request ID on the next
/// replica, as a client with client-side balancing does.
fn place_orders(clients: Vec<OrderClient>, n: usize, every: Duration) -> JoinHandle<Vec<Placed>> {
    tokio::spawn(async move {
        let mut tasks = vec![];
        for i in 0..n {
            let clients = clients.clone();
            tasks.push(tokio::spawn(async move {
                let poor = i % 10 == 3;
                let request_id = request_id();
                let customer = if poor { "poor" } else { "alice" };
                let request = order(&request_id, customer, &[("BOOK", 1)], "DE");
                for attempt in 0..400 {
                    let client = &clients[(i + attempt) % clients.len()];
                    let call = client.create_order(request.clone());
                    if let Ok(Ok(created)) =
                        tokio::time::timeout(Duration::from_secs(2), call).await
                    {
                        return Placed {
                            request_id,
                            poor,
                            order_id: created.order_id,
                        };
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                panic!("order {request_id} could not be placed on any replica");
            }));
            tokio::time::sleep(every).await;
        }
        futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|placed| placed.expect("a client task"))
            .collect()
    })
}

/// Waits for every order to end, asking whichever replica answers.
async fn wait_all_terminal(clients: &[OrderClient], placed: &[Placed]) -> Vec<OrderStatus> {
    let mut statuses = vec![];
    for (i, order) in placed.iter().enumerate() {
        let status = eventually("the order to end", Duration::from_secs(120), || {
            let client = clients[i % clients.len()].clone();
            let fallback = clients[(i + 1) % clients.len()].clone();
            let id = order.order_id.clone();
            async move {
                let got = match tokio::time::timeout(Duration::from_secs(1), client.get_order(&id))
                    .await
                {
                    Ok(Ok(got)) => got,
                    _ => fallback.get_order(&id).await.ok()?,
                };
                let status = OrderStatus::try_from(got.status).ok()?;
                (!matches!(status, OrderStatus::Running | OrderStatus::Compensating))
                    .then_some(status)
            }
        })
        .await;
        statuses.push(status);
    }
    statuses
}

/// Every order ended once, as its customer dictates, with every effect at
/// most once and the books balanced; and the log shows that no saga was
/// written by two replicas at once: along each saga's progress, and along
/// its events, the epoch never goes back.
async fn audit(cluster: &Cluster, placed: &[Placed], statuses: &[OrderStatus]) {
    let pool = cluster.db.pool().await;
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, placed.len() as i64, "one order per request");
    for (order, status) in placed.iter().zip(statuses) {
        let expected = if order.poor {
            OrderStatus::Compensated
        } else {
            OrderStatus::Completed
        };
        assert_eq!(
            *status, expected,
            "order {} ({})",
            order.order_id, order.request_id
        );
    }
    let completed = placed.iter().filter(|o| !o.poor).count() as i64;
    let effects = cluster.services.effects().await;
    effects.assert_conserved();
    assert_eq!(
        (
            effects.reserved,
            effects.shipments_prepared,
            effects.charged
        ),
        (completed, completed, completed),
        "each completed order holds one reservation, one shipment and one charge, and no other order any: {effects:?}"
    );

    let steps: Vec<(String, String, i64, i64)> =
        sqlx::query_as("SELECT saga_id, phase, step_index, epoch FROM saga_steps")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut progress: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for (saga, phase, index, epoch) in steps {
        // Forward steps in order, then compensations in reverse order.
        let position = if phase == "forward" {
            index
        } else {
            100 - index
        };
        progress.entry(saga).or_default().push((position, epoch));
    }
    for (saga, mut records) in progress {
        records.sort();
        let epochs: Vec<i64> = records.iter().map(|(_, e)| *e).collect();
        assert!(
            epochs.is_sorted(),
            "saga {saga} was written under an older epoch after a newer one: {records:?}"
        );
    }
    let events: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT aggregate_id, sequence, epoch FROM outbox ORDER BY aggregate_id, sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for pair in events.windows(2) {
        if pair[0].0 == pair[1].0 {
            assert!(
                pair[0].2 <= pair[1].2,
                "events of {} went back in epoch: {pair:?}",
                pair[0].0
            );
        }
    }
}

/// kill -9 of the replica that also publishes the outbox, under load: its
/// sagas are taken over within the lease, the relay's lead passes on, every
/// order ends once, and each order's events arrive in order.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_of_one_replica_under_load() {
    let exchange = unique_exchange();
    let mut events = consume(&exchange).await;
    let mut cluster = Cluster::start(3, LEASE_MS, 150, Some(&exchange)).await;
    let clients = cluster.clients();
    let load = place_orders(clients.clone(), 90, Duration::from_millis(30));
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let victim = eventually("a relay to lead", Duration::from_secs(10), || {
        cluster.relay_leader()
    })
    .await;
    let owned = cluster.open_sagas_of(victim).await;
    assert!(!owned.is_empty(), "the victim drives no saga at the kill");
    cluster.replicas[victim].kill().await;
    let killed = Instant::now();
    eventually(
        "a new owner's first checkpoint",
        Duration::from_secs(10),
        || async {
            cluster
                .checkpointed_by_new_owner(&owned)
                .await
                .then_some(())
        },
    )
    .await;
    let takeover = killed.elapsed();
    println!(
        "takeover: {} ms from kill -9 to the first checkpoint by a new owner ({} sagas, lease {LEASE_MS} ms)",
        takeover.as_millis(),
        owned.len()
    );
    assert!(
        takeover < Duration::from_millis(LEASE_MS + 1_500),
        "took {takeover:?} with a lease of {LEASE_MS} ms"
    );

    let placed = load.await.unwrap();
    let statuses = wait_all_terminal(&clients, &placed).await;
    audit(&cluster, &placed, &statuses).await;
    assert!(
        eventually("another relay to lead", Duration::from_secs(10), || cluster
            .relay_leader())
        .await
            != victim
    );

    // Every order's events: its terminal one arrives; each order's events
    // arrive in sequence (the first delivery of each; duplicates share an ID).
    let terminal = placed.len();
    let delivered = collect_until(&mut events, Duration::from_secs(60), |got| {
        got.iter()
            .filter(|e| e.routing_key == "order.completed" || e.routing_key == "order.compensated")
            .count()
            >= terminal
    })
    .await;
    let mut last: HashMap<String, i64> = HashMap::new();
    for event in &delivered {
        let order = event.field("order_id").as_str().unwrap().to_owned();
        let sequence = event.field("sequence").as_i64().unwrap();
        let before = last.insert(order.clone(), sequence).unwrap_or(0);
        assert!(
            sequence > before,
            "order {order}: event {sequence} arrived after {before}"
        );
    }
}

/// A replica paused (SIGSTOP) past its lease loses its sagas to the others;
/// woken, it is fenced: it writes nothing to them, notices, and rejoins.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_paused_past_its_lease_is_fenced_and_rejoins() {
    let cluster = Cluster::start(3, LEASE_MS, 400, None).await;
    let clients = cluster.clients();
    let load = place_orders(clients.clone(), 45, Duration::from_millis(40));
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    let victim = 1;
    let owned = cluster.open_sagas_of(victim).await;
    assert!(!owned.is_empty(), "the victim drives no saga at the pause");
    cluster.replicas[victim].signal("STOP");
    eventually(
        "the others to take the paused replica's sagas",
        Duration::from_secs(10),
        || async { (cluster.still_owned(victim, &owned).await == 0).then_some(()) },
    )
    .await;
    let old_records = |pool: AnyPool, owned: Vec<String>| async move {
        let rows: Vec<(String, String, i64, String, i64)> = sqlx::query_as(
            "SELECT saga_id, phase, step_index, status, attempts FROM saga_steps WHERE epoch = 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.into_iter()
            .filter(|r| owned.contains(&r.0))
            .collect::<HashSet<_>>()
    };
    let before = old_records(cluster.db.pool().await, owned.clone()).await;
    cluster.replicas[victim].signal("CONT");

    let placed = load.await.unwrap();
    let statuses = wait_all_terminal(&clients, &placed).await;
    let after = old_records(cluster.db.pool().await, owned.clone()).await;
    assert!(
        after.is_subset(&before),
        "the fenced replica wrote under its old epoch: {:?}",
        after.difference(&before).collect::<Vec<_>>()
    );
    audit(&cluster, &placed, &statuses).await;
    let metrics = cluster.replicas[victim].scrape().await;
    let fenced = metric(&metrics, "saga_fenced_total");
    assert!(
        fenced >= 1.0,
        "the paused replica never noticed it was fenced:\n{metrics}"
    );

    // It rejoined: it takes orders and drives them.
    let rejoined = place_orders(vec![clients[victim].clone()], 3, Duration::ZERO)
        .await
        .unwrap();
    let statuses = wait_all_terminal(&clients[victim..=victim], &rejoined).await;
    assert!(
        statuses.iter().all(|s| *s == OrderStatus::Completed),
        "{statuses:?}"
    );
    for order in &rejoined {
        let owner: String = sqlx::query_scalar("SELECT owner FROM sagas WHERE saga_id = $1")
            .bind(&order.order_id)
            .fetch_one(&cluster.db.pool().await)
            .await
            .unwrap();
        assert_eq!(owner, format!("r{victim}"));
    }
}

/// A rolling restart (SIGTERM, start again) of every replica under load: each
/// hands its sagas over as it goes, so nothing waits for a lease to run out
/// (the lease here is 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_every_replica_waits_for_no_lease() {
    let lease_ms = 30_000;
    let mut cluster = Cluster::start(3, lease_ms, 200, None).await;
    let clients = cluster.clients();
    let load = place_orders(clients.clone(), 90, Duration::from_millis(60));
    let since = Instant::now();
    for victim in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let owned = cluster.open_sagas_of(victim).await;
        let stopping = Instant::now();
        cluster.replicas[victim].terminate().await;
        eventually(
            "the others to take the stopped replica's sagas",
            Duration::from_secs(5),
            || async { (cluster.still_owned(victim, &owned).await == 0).then_some(()) },
        )
        .await;
        println!(
            "hand-over of r{victim}: {} sagas taken within {} ms of SIGTERM (lease {lease_ms} ms)",
            owned.len(),
            stopping.elapsed().as_millis()
        );
        cluster.replicas[victim].start().await;
    }
    let placed = load.await.unwrap();
    let statuses = wait_all_terminal(&clients, &placed).await;
    assert!(
        since.elapsed() < Duration::from_millis(lease_ms),
        "the rolling restart took {:?}: something waited for a lease",
        since.elapsed()
    );
    audit(&cluster, &placed, &statuses).await;
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Every replica serves the whole API for sagas another replica drives: a
/// watch streams them to their end, a `CreateOrder` with `wait` returns
/// when they end, a cancel reaches their driver, and lists show them.
#[tokio::test(flavor = "multi_thread")]
async fn every_replica_serves_the_sagas_another_drives() {
    let cluster = Cluster::start(2, LEASE_MS, 300, None).await;
    let clients = cluster.clients();
    let (driver, other) = (&clients[0], &clients[1]);

    let rid = request_id();
    let request = order(&rid, "alice", &[("BOOK", 1)], "DE");
    let created = driver.create_order(request.clone()).await.unwrap();
    let since = Instant::now();
    let mut watch = other.watch_order(&created.order_id).await.unwrap();
    let waited = {
        let other = other.clone();
        tokio::spawn(async move {
            other
                .create_order_and_wait(request, Duration::from_secs(30))
                .await
        })
    };
    let mut seen = vec![];
    while let Some(message) = tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("the watch on the other replica goes quiet")
        .unwrap()
    {
        let status = OrderStatus::try_from(message.order.unwrap().status).unwrap();
        seen.push(status);
    }
    assert_eq!(
        seen.last(),
        Some(&OrderStatus::Completed),
        "the other replica's watch: {seen:?}"
    );
    assert!(
        seen.len() >= 2,
        "it streamed the changes, not just the end: {seen:?}"
    );
    let waited = waited
        .await
        .unwrap()
        .expect("CreateOrder with wait on the other replica");
    assert_eq!(waited.order_id, created.order_id);
    assert_eq!(
        OrderStatus::try_from(waited.status),
        Ok(OrderStatus::Completed)
    );
    assert!(
        since.elapsed() < Duration::from_secs(15),
        "took {:?}",
        since.elapsed()
    );

    // A cancel on the other replica ends the saga its driver runs.
    let rid = request_id();
    let created = driver
        .create_order(order(&rid, "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    other
        .cancel_order(&created.order_id, request_id(), "changed my mind")
        .await
        .expect("the cancel is accepted before the charge");
    let ended = wait_all_terminal(
        std::slice::from_ref(driver),
        &[Placed {
            request_id: rid,
            poor: false,
            order_id: created.order_id.clone(),
        }],
    )
    .await;
    assert_eq!(ended, vec![OrderStatus::Cancelled]);
    let owner: String = sqlx::query_scalar("SELECT owner FROM sagas WHERE saga_id = $1")
        .bind(&created.order_id)
        .fetch_one(&cluster.db.pool().await)
        .await
        .unwrap();
    assert_eq!(owner, "r0", "the cancel did not move the saga");

    let listed = other
        .list_orders(Default::default())
        .await
        .unwrap()
        .orders
        .len();
    assert_eq!(listed, 2, "the other replica lists both orders");
}

/// A process stopped in the middle of a transaction (SIGSTOP, a long GC-like
/// stall, a partition) must not hold its row locks for as long as it stays
/// stuck: a replica's successors would wait on them, past its lease.
/// PostgreSQL ends such a session after 3 s idle in its transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_left_open_by_a_stuck_process_releases_its_locks() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = svc_kit::store::Store::open(&db.url, &orchestrator::MIGRATIONS, Default::default())
        .await
        .unwrap();
    let pool = &store.pool;
    sqlx::query("CREATE TABLE held (id TEXT PRIMARY KEY, holder TEXT NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO held VALUES ('o1', 'nobody')")
        .execute(pool)
        .await
        .unwrap();
    // The stuck process: its transaction holds the row, then nothing more.
    let mut stuck = pool.begin().await.unwrap();
    sqlx::query("UPDATE held SET holder = 'stuck' WHERE id = 'o1'")
        .execute(&mut *stuck)
        .await
        .unwrap();
    let since = std::time::Instant::now();
    let successor = tokio::time::timeout(
        Duration::from_secs(20),
        sqlx::query("UPDATE held SET holder = 'successor' WHERE id = 'o1'").execute(pool),
    )
    .await
    .expect("the successor waited on the stuck transaction's lock for 20 s")
    .unwrap();
    assert_eq!(successor.rows_affected(), 1);
    assert!(
        since.elapsed() < Duration::from_secs(10),
        "{:?}",
        since.elapsed()
    );
    // The stuck session is gone, and its change with it.
    assert!(stuck.commit().await.is_err());
    let holder: String = sqlx::query_scalar("SELECT holder FROM held WHERE id = 'o1'")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(holder, "successor");
}
