//! Publishes the outbox to RabbitMQ.
//!
//! - A durable topic exchange; persistent messages; the routing key is the event
//!   type, `message_id` the event ID, and the W3C `traceparent` a header.
//! - Publisher confirms: an event is marked sent only after the broker confirmed
//!   it. Delivery is therefore at least once; consumers dedupe by `message_id`.
//! - Nothing is confirmed into the void: events are published `mandatory`, and
//!   one that no queue is bound for comes back and is parked in the durable
//!   queue `<exchange>.unrouted` (with its routing key in the header
//!   `x-unrouted-routing-key`) before it counts as sent. A deployment that
//!   binds its consumers late finds every event there.
//! - Events go out in outbox order, so each order's events arrive in sequence.
//! - While the broker is down or unreachable, the relay retries with backoff and
//!   the events wait in the outbox; after it returns, they are all delivered.
//! - Sent events are pruned after the retention period.
//! - With several replicas, one relay publishes at a time (see [`super::leader`]).
//!
//! - Over TLS (`amqps://`, or `RABBITMQ_TLS` with the parts), trusting the
//!   system's roots or `RABBITMQ_TLS_CA`, with a client certificate for mTLS
//!   (`RABBITMQ_TLS_CERT`/`RABBITMQ_TLS_KEY`).
//!
//! With no broker configured, the relay only measures the backlog.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use clap::Args;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
    },
    tcp::{OwnedIdentity, OwnedTLSConfig},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{AnyPool, Row};
use svc_kit::time::now_ms;
use tokio::{sync::watch, task::JoinHandle};

use saga_engine::{
    crash_points::{self, point},
    log::LogWriter,
};

use super::leader::RelayLeader;

/// Most events published per confirm round.
const BATCH: i64 = 256;
/// How often an idle relay looks for new events.
const POLL: Duration = Duration::from_millis(50);
/// How often, at most, the backlog's gauges are measured. Counting the
/// unsent events costs as much as the backlog is long, and a relay draining
/// a long backlog (the broker was away) counted it before every batch.
const MEASURE_EVERY: Duration = Duration::from_secs(1);
/// A longer wait after a measurement that took long, successful or not: a
/// twentieth of the relay's time goes to its gauges while a measurement
/// takes under 1.5 s (with no broker configured, every event stays unsent
/// and the count grows with them); beyond that, one every
/// [`MEASURE_WAIT_AT_MOST`].
const MEASURE_SHARE: u32 = 20;
const MEASURE_WAIT_AT_MOST: Duration = Duration::from_secs(30);
/// The backlog's gauges: the count reads the index of unsent events, and
/// the oldest is the first unsent event in that index, one probe.
/// `MIN(created_at_ms)` read every unsent row from the table, a whole
/// backlog's pages each time. The order names `sent_at_ms` (NULL in every
/// row here) because PostgreSQL does not take `IS NULL` as one value: by
/// `id` alone it walked the primary key through every sent event kept.
const MEASURE: &str = "SELECT (SELECT COUNT(*) FROM outbox WHERE sent_at_ms IS NULL) AS backlog, \
     CAST(COALESCE((SELECT created_at_ms FROM outbox WHERE sent_at_ms IS NULL \
       ORDER BY sent_at_ms, id LIMIT 1), 0) AS BIGINT) AS oldest";
/// The next events to publish, oldest first, from the index of unsent
/// events (ordered as [`MEASURE`] is, for the same reason).
const NEXT_BATCH: &str = "SELECT id, event_id, event_type, payload, traceparent, created_at_ms FROM outbox \
     WHERE sent_at_ms IS NULL ORDER BY sent_at_ms, id LIMIT $1";
/// How often a relay that does not lead runs for the lead.
const FOLLOW: Duration = Duration::from_secs(1);
/// Longest wait for the broker on a live connection: the connection and its
/// channel set up, a batch published and confirmed, a close. A partition can
/// leave a connection open but silent (no RST, no FIN), and RabbitMQ's
/// heartbeat takes a minute or more to notice; past this bound the relay
/// drops the connection and makes a new one. A batch of 256 confirms
/// normally takes milliseconds.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Full AMQP URL of RabbitMQ, e.g. `amqp://user:pass@rabbitmq:5672/%2f`. Wins over the RABBITMQ_* parts.
    #[arg(
        long,
        env = "RABBITMQ_URL",
        value_name = "RABBITMQ_URL",
        hide_env_values = true
    )]
    pub rabbitmq_url: Option<SecretString>,

    /// RabbitMQ host; with no URL and no host, events stay in the outbox.
    #[arg(long, env = "RABBITMQ_HOST", value_name = "RABBITMQ_HOST")]
    pub rabbitmq_host: Option<String>,

    #[arg(
        long,
        env = "RABBITMQ_PORT",
        value_name = "RABBITMQ_PORT",
        default_value_t = 5672
    )]
    pub rabbitmq_port: u16,

    #[arg(
        long,
        env = "RABBITMQ_USER",
        value_name = "RABBITMQ_USER",
        default_value = "guest"
    )]
    pub rabbitmq_user: String,

    #[arg(
        long,
        env = "RABBITMQ_PASSWORD",
        value_name = "RABBITMQ_PASSWORD",
        hide_env_values = true
    )]
    pub rabbitmq_password: Option<SecretString>,

    #[arg(
        long,
        env = "RABBITMQ_VHOST",
        value_name = "RABBITMQ_VHOST",
        default_value = "/"
    )]
    pub rabbitmq_vhost: String,

    /// With the RABBITMQ_* parts: connect over TLS (`amqps://`). A
    /// RABBITMQ_URL says so by its scheme.
    #[arg(
        long,
        env = "RABBITMQ_TLS",
        value_name = "RABBITMQ_TLS",
        default_value_t = false
    )]
    pub rabbitmq_tls: bool,

    /// PEM file of the CA that signed the broker's certificate, when it is not
    /// one the system trusts. Needs an amqps:// broker.
    #[arg(long, env = "RABBITMQ_TLS_CA", value_name = "RABBITMQ_TLS_CA")]
    pub rabbitmq_tls_ca: Option<PathBuf>,

    /// PEM certificate the relay presents to the broker (mTLS); with RABBITMQ_TLS_KEY.
    #[arg(long, env = "RABBITMQ_TLS_CERT", value_name = "RABBITMQ_TLS_CERT")]
    pub rabbitmq_tls_cert: Option<PathBuf>,

    /// PEM (PKCS#8) private key of RABBITMQ_TLS_CERT.
    #[arg(long, env = "RABBITMQ_TLS_KEY", value_name = "RABBITMQ_TLS_KEY")]
    pub rabbitmq_tls_key: Option<PathBuf>,

    /// The topic exchange order events are published to.
    #[arg(
        long,
        env = "EVENTS_EXCHANGE",
        value_name = "EVENTS_EXCHANGE",
        default_value = "orders.events"
    )]
    pub events_exchange: String,

    /// How long sent events stay in the outbox, in seconds.
    #[arg(long, env = "OUTBOX_RETENTION_SECS", value_name = "OUTBOX_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub outbox_retention_secs: u64,
}

impl Default for BrokerArgs {
    fn default() -> Self {
        BrokerArgs {
            rabbitmq_url: None,
            rabbitmq_host: None,
            rabbitmq_port: 5672,
            rabbitmq_user: "guest".into(),
            rabbitmq_password: None,
            rabbitmq_vhost: "/".into(),
            rabbitmq_tls: false,
            rabbitmq_tls_ca: None,
            rabbitmq_tls_cert: None,
            rabbitmq_tls_key: None,
            events_exchange: "orders.events".into(),
            outbox_retention_secs: 7 * 24 * 3600,
        }
    }
}

impl BrokerArgs {
    /// The AMQP URL, if a broker is configured.
    pub fn url(&self) -> Option<String> {
        if let Some(url) = &self.rabbitmq_url {
            return Some(url.expose_secret().to_owned());
        }
        let host = self.rabbitmq_host.as_ref()?;
        let password = self
            .rabbitmq_password
            .as_ref()
            .map(|p| p.expose_secret().to_owned())
            .unwrap_or_else(|| "guest".into());
        Some(format!(
            "{}://{}:{}@{host}:{}/{}",
            if self.rabbitmq_tls { "amqps" } else { "amqp" },
            encode(&self.rabbitmq_user),
            encode(&password),
            self.rabbitmq_port,
            encode(&self.rabbitmq_vhost)
        ))
    }
}

impl BrokerArgs {
    /// The TLS files, read and checked now so that a wrong path stops the
    /// start-up with the setting's name rather than failing every reconnect.
    pub fn tls(&self) -> anyhow::Result<OwnedTLSConfig> {
        let url = self.url();
        let tls_url = url
            .as_deref()
            .is_some_and(|url| url.starts_with("amqps://"));
        let any_file = self.rabbitmq_tls_ca.is_some()
            || self.rabbitmq_tls_cert.is_some()
            || self.rabbitmq_tls_key.is_some();
        if any_file && !tls_url {
            anyhow::bail!(
                "RABBITMQ_TLS_CA / RABBITMQ_TLS_CERT / RABBITMQ_TLS_KEY are set, but the broker is not \
                 reached over TLS: use an amqps:// RABBITMQ_URL, or RABBITMQ_TLS=true with RABBITMQ_HOST"
            );
        }
        let read =
            |setting: &str, path: &PathBuf, kind: &str| svc_kit::tls::read_pem(setting, path, kind);
        let cert_chain = self
            .rabbitmq_tls_ca
            .as_ref()
            .map(|ca| read("RABBITMQ_TLS_CA", ca, "CERTIFICATE"))
            .transpose()?
            .map(|pem| String::from_utf8_lossy(&pem).into_owned());
        let identity = match (&self.rabbitmq_tls_cert, &self.rabbitmq_tls_key) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read("RABBITMQ_TLS_CERT", cert, "CERTIFICATE")?,
                key: read("RABBITMQ_TLS_KEY", key, "PRIVATE KEY")?,
            }),
            (None, None) => None,
            _ => anyhow::bail!(
                "RABBITMQ_TLS_CERT and RABBITMQ_TLS_KEY go together: set both or neither"
            ),
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

/// Percent-encodes everything but unreserved URL characters.
fn encode(part: &str) -> String {
    part.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Outbox gauges, refreshed by the relay.
#[derive(Clone, Default)]
pub struct OutboxMetrics {
    backlog: Gauge,
    oldest_age_ms: Gauge,
}

impl OutboxMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = OutboxMetrics::default();
        registry.register(
            "outbox_backlog",
            "Events not yet confirmed by the broker",
            metrics.backlog.clone(),
        );
        registry.register(
            "outbox_oldest_age_milliseconds",
            "Age of the oldest unsent event",
            metrics.oldest_age_ms.clone(),
        );
        metrics
    }
}

pub struct Relay {
    pool: AnyPool,
    /// What the relay writes (sent marks, pruning) goes through the engine's
    /// log writer, the one writer of these tables.
    writer: LogWriter,
    url: Option<String>,
    tls: OwnedTLSConfig,
    exchange: String,
    retention: Duration,
    metrics: OutboxMetrics,
    /// When the backlog may be measured again.
    next_measure: tokio::time::Instant,
    measure_failed: bool,
    leader: RelayLeader,
}

impl Relay {
    pub fn new(
        pool: AnyPool,
        writer: LogWriter,
        args: &BrokerArgs,
        metrics: OutboxMetrics,
        leader: RelayLeader,
    ) -> anyhow::Result<Self> {
        Ok(Relay {
            leader,
            pool,
            writer,
            tls: args.tls()?,
            url: args.url(),
            exchange: args.events_exchange.clone(),
            retention: Duration::from_secs(args.outbox_retention_secs),
            metrics,
            next_measure: tokio::time::Instant::now(),
            measure_failed: false,
        })
    }

    pub fn spawn(self, stopping: watch::Receiver<bool>) -> JoinHandle<()> {
        if self.url.is_none() {
            tracing::info!(
                "no RabbitMQ configured (RABBITMQ_URL or RABBITMQ_HOST): order events stay in the outbox, relay off"
            );
        }
        tokio::spawn(self.run(stopping))
    }

    async fn run(mut self, mut stopping: watch::Receiver<bool>) {
        let mut failures = 0u32;
        while !*stopping.borrow() {
            let Some(url) = self.url.clone() else {
                self.measure().await;
                sleep_or_stop(&mut stopping, Duration::from_secs(5)).await;
                continue;
            };
            if !self.leader.lead().await {
                self.measure().await;
                sleep_or_stop(&mut stopping, FOLLOW).await;
                continue;
            }
            match connect(&url, &self.tls, &self.exchange).await {
                Ok((connection, channel)) => {
                    if failures > 0 {
                        tracing::info!("reconnected to RabbitMQ; publishing the outbox");
                    }
                    failures = 0;
                    if let Err(err) = self.pump(&channel, &mut stopping).await {
                        tracing::warn!(error = %err, "lost RabbitMQ; events wait in the outbox");
                    }
                    // On a silent connection a close would wait forever.
                    let _ = tokio::time::timeout(
                        BROKER_TIMEOUT,
                        connection.close(200, "relay stopping".into()),
                    )
                    .await;
                }
                Err(err) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %err, failures, "cannot reach RabbitMQ; events wait in the outbox");
                    }
                    self.measure().await;
                    let wait = Duration::from_millis(100u64 << failures.min(6))
                        .min(Duration::from_secs(5));
                    sleep_or_stop(&mut stopping, wait).await;
                }
            }
        }
        self.leader.resign().await;
    }

    /// Publishes unsent events until the broker fails, this replica loses
    /// the lead, or the process stops.
    async fn pump(
        &mut self,
        channel: &Channel,
        stopping: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut last_prune = tokio::time::Instant::now() - Duration::from_secs(3600);
        while !*stopping.borrow() {
            if !self.leader.lead().await {
                return Ok(());
            }
            if last_prune.elapsed() > Duration::from_secs(60) {
                self.prune().await;
                last_prune = tokio::time::Instant::now();
            }
            self.measure().await;
            let rows = sqlx::query(NEXT_BATCH)
                .bind(BATCH)
                .fetch_all(&self.pool)
                .await?;
            if rows.is_empty() {
                sleep_or_stop(stopping, POLL).await;
                continue;
            }
            let (confirmed, total) =
                tokio::time::timeout(BROKER_TIMEOUT, self.publish(channel, &rows))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "the broker confirmed no batch within {BROKER_TIMEOUT:?}; reconnecting"
                        )
                    })??;
            self.mark_sent(&confirmed).await?;
            if confirmed.len() < total {
                anyhow::bail!("broker refused an event");
            }
        }
        Ok(())
    }

    /// Publishes `rows` and waits for their confirms. Returns the IDs to mark
    /// sent (those confirmed, up to the first refusal, so nothing after a
    /// refused event is skipped) and how many were published.
    async fn publish(
        &self,
        channel: &Channel,
        rows: &[sqlx::any::AnyRow],
    ) -> anyhow::Result<(Vec<i64>, usize)> {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let event_id: String = row.try_get("event_id")?;
            let event_type: String = row.try_get("event_type")?;
            let payload: String = row.try_get("payload")?;
            let traceparent: String = row.try_get("traceparent")?;
            let created_at_ms: i64 = row.try_get("created_at_ms")?;
            let mut headers = FieldTable::default();
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(LongString::from(traceparent)),
            );
            let properties = BasicProperties::default()
                .with_message_id(ShortString::from(event_id))
                .with_type(ShortString::from(event_type.clone()))
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp((created_at_ms / 1000) as u64)
                .with_headers(headers);
            let confirm = channel
                .basic_publish(
                    ShortString::from(self.exchange.clone()),
                    ShortString::from(event_type),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    payload.as_bytes(),
                    properties,
                )
                .await?;
            pending.push((id, confirm));
        }
        crash_points::reach(point::AFTER_PUBLISH).await;
        let mut confirmed = Vec::with_capacity(pending.len());
        let total = pending.len();
        // Events no queue was bound for come back with their confirms. Their
        // parking is published as they come and confirmed together after,
        // not one round trip to the broker each: when consumers bind only
        // some event types, every event of the others is parked.
        let mut parking = Vec::new();
        let mut unrouted = BTreeMap::<String, usize>::new();
        for (id, confirm) in pending {
            match confirm.await? {
                Confirmation::Ack(None) => confirmed.push(id),
                Confirmation::Ack(Some(returned)) => {
                    *unrouted
                        .entry(returned.delivery.routing_key.as_str().to_owned())
                        .or_default() += 1;
                    parking.push(self.park(channel, returned.delivery).await?);
                    confirmed.push(id);
                }
                other => {
                    tracing::warn!(?other, "the broker refused an event; retrying from it");
                    break;
                }
            }
        }
        if !unrouted.is_empty() {
            tracing::warn!(
                ?unrouted,
                "no queue is bound for some events; parking them in the unrouted queue"
            );
        }
        // Marked sent only once every parked event is kept: if one is not,
        // none of this batch is marked, and all of it is published again.
        for parked in parking {
            match parked.await? {
                Confirmation::Ack(None) => {}
                other => anyhow::bail!("the broker did not keep a parked event: {other:?}"),
            }
        }
        Ok((confirmed, total))
    }

    /// Publishes an event no queue was bound for to `<exchange>.unrouted`,
    /// through the default exchange; the broker's confirm is returned to
    /// await.
    async fn park(
        &self,
        channel: &Channel,
        returned: lapin::message::Delivery,
    ) -> anyhow::Result<PublisherConfirm> {
        let routing_key = returned.routing_key.as_str().to_owned();
        let mut properties = returned.properties;
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-unrouted-routing-key".into(),
            AMQPValue::LongString(LongString::from(routing_key)),
        );
        properties = properties.with_headers(headers);
        Ok(channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(unrouted_queue(&self.exchange)),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &returned.data,
                properties,
            )
            .await?)
    }

    async fn mark_sent(&self, ids: &[i64]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.writer
            .events_sent(ids.to_vec(), now_ms())
            .await
            .map_err(anyhow::Error::msg)
    }

    async fn prune(&self) {
        let cutoff = now_ms() - self.retention.as_millis() as i64;
        match self.writer.prune_sent_events(cutoff).await {
            Ok(pruned) if pruned > 0 => {
                tracing::info!(pruned, "pruned sent events from the outbox")
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot prune the outbox"),
        }
    }

    /// Sets the backlog's gauges, unless they were set less than
    /// [`MEASURE_EVERY`] ago, or [`MEASURE_SHARE`] times the last
    /// measurement's own time (at most [`MEASURE_WAIT_AT_MOST`]).
    async fn measure(&mut self) {
        let started = tokio::time::Instant::now();
        if started < self.next_measure {
            return;
        }
        let measured = sqlx::query(MEASURE)
            .fetch_one(&self.pool)
            .await
            .and_then(|row| {
                Ok((
                    row.try_get::<i64, _>("backlog")?,
                    row.try_get::<i64, _>("oldest")?,
                ))
            });
        match measured {
            Ok((backlog, oldest)) => {
                self.metrics.backlog.set(backlog);
                self.metrics
                    .oldest_age_ms
                    .set(if backlog == 0 { 0 } else { now_ms() - oldest });
                if self.measure_failed {
                    tracing::info!("the outbox's backlog is measured again");
                }
                self.measure_failed = false;
            }
            Err(err) => {
                // The gauges keep their last values; said once per run of
                // failures.
                if !self.measure_failed {
                    tracing::warn!(error = %err, "cannot measure the outbox's backlog");
                }
                self.measure_failed = true;
            }
        }
        // A failure that takes long (a timeout) costs as much as a slow count.
        self.next_measure = started
            + (started.elapsed() * MEASURE_SHARE).clamp(MEASURE_EVERY, MEASURE_WAIT_AT_MOST);
    }
}

/// The connection and its channel, set up within [`BROKER_TIMEOUT`].
async fn connect(
    url: &str,
    tls: &OwnedTLSConfig,
    exchange: &str,
) -> anyhow::Result<(Connection, Channel)> {
    tokio::time::timeout(BROKER_TIMEOUT, set_up(url, tls, exchange))
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to RabbitMQ"))?
}

async fn set_up(
    url: &str,
    tls: &OwnedTLSConfig,
    exchange: &str,
) -> anyhow::Result<(Connection, Channel)> {
    let connection = Connection::connect_with_config(
        url,
        ConnectionProperties::default(),
        tls.clone(),
        lapin::runtime::default_runtime()?,
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .exchange_declare(
            ShortString::from(exchange.to_owned()),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            ShortString::from(unrouted_queue(exchange)),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel))
}

/// The durable queue that keeps events no queue was bound for.
pub fn unrouted_queue(exchange: &str) -> String {
    format!("{exchange}.unrouted")
}

async fn sleep_or_stop(stopping: &mut watch::Receiver<bool>, wait: Duration) {
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        _ = stopping.wait_for(|s| *s) => {}
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, params};
    use sqlx::Row;

    use super::{BATCH, MEASURE, NEXT_BATCH};

    /// Bytes this thread has read through `read` calls so far, where Linux
    /// counts them (`None` elsewhere).
    fn bytes_read_by_this_thread() -> Option<u64> {
        let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
        io.lines()
            .find_map(|line| line.strip_prefix("rchar: "))?
            .parse()
            .ok()
    }

    /// The gauges of a backlog of 20,000 unsent events read the index of
    /// unsent events, not every unsent row: on a connection with a cold
    /// cache, the statement reads a few hundred KiB, not the backlog's 7.7 MB.
    #[tokio::test]
    async fn the_backlog_is_measured_from_its_index_not_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orchestrator.db");
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        crate::SQLITE_MIGRATIONS.run(&pool).await.unwrap();

        let mut conn = Connection::open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        let payload = "x".repeat(300);
        for n in 0..20_000i64 {
            tx.execute(
                "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms) \
                 VALUES (?1, ?2, 1, 'order.created', ?3, '', ?4)",
                params![format!("event-{n}"), format!("saga-{n:08}"), payload, 5_000 + n],
            )
            .unwrap();
        }
        // The first events were sent: the oldest unsent is the 101st.
        tx.execute("UPDATE outbox SET sent_at_ms = 1 WHERE id <= 100", [])
            .unwrap();
        tx.commit().unwrap();
        drop(conn);

        // What the relay reads, through its own pool.
        let row = sqlx::query(MEASURE).fetch_one(&pool).await.unwrap();
        let measured: (i64, i64) = (row.get("backlog"), row.get("oldest"));
        assert_eq!(measured, (19_900, 5_100));
        pool.close().await;

        // What it costs, on a connection with a cold cache that reads the
        // file through `read` calls (no memory map), on this thread.
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "mmap_size", 0).unwrap();
        let Some(before) = bytes_read_by_this_thread() else {
            eprintln!("skipped: no /proc/thread-self/io to count the bytes read");
            return;
        };
        conn.query_row(MEASURE, [], |_| Ok(())).unwrap();
        let read = bytes_read_by_this_thread().unwrap() - before;
        // Reading every unsent row from the table read 7.7 MB; the index
        // alone, 0.28 MB.
        assert!(read < 1_000_000, "measuring the backlog read {read} bytes");
    }

    /// On PostgreSQL, with 100,000 sent events kept and 1,000 unsent, the
    /// gauges and the next batch (under a generic plan, as a prepared
    /// statement may get) come from the index of unsent events. Ordered by
    /// `id` alone, both walked the primary key through every sent event
    /// first: 5,546 and 5,552 buffers here. (A database left behind by a
    /// failed run is named `relay_…`.)
    #[tokio::test]
    async fn the_gauges_and_the_next_batch_skip_the_sent_events_on_postgres() {
        sqlx::any::install_default_drivers();
        let admin_url = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let admin = sqlx::AnyPool::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url} is unreachable: {e}"));
        let name = format!("relay_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let pool = sqlx::AnyPool::connect(&format!("{base}/{name}"))
            .await
            .unwrap();
        crate::POSTGRES_MIGRATIONS.run(&pool).await.unwrap();
        sqlx::query(
            "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, \
               created_at_ms, sent_at_ms) \
             SELECT 'event-' || i, 'saga-' || lpad(i::text, 8, '0'), 1, 'order.created', repeat('x', 300), '', \
               5000 + i, CASE WHEN i < 100000 THEN 1 END \
             FROM generate_series(0, 100999) AS i",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("VACUUM ANALYZE outbox")
            .execute(&pool)
            .await
            .unwrap();

        let row = sqlx::query(MEASURE).fetch_one(&pool).await.unwrap();
        let measured: (i64, i64) = (row.get("backlog"), row.get("oldest"));
        assert_eq!(measured, (1_000, 105_000));
        let batch = sqlx::query(NEXT_BATCH)
            .bind(BATCH)
            .fetch_all(&pool)
            .await
            .unwrap();
        let first: i64 = batch[0].get("created_at_ms");
        assert_eq!((batch.len(), first), (BATCH as usize, 105_000));

        // The relay's statements are prepared, and PostgreSQL may keep a
        // generic plan for them: the batch's `LIMIT $1` is planned unknown.
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PREPARE next_batch(bigint) AS {NEXT_BATCH}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let execute_next_batch = format!("EXECUTE next_batch({BATCH})");
        for statement in [MEASURE, execute_next_batch.as_str()] {
            let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) {statement}"
            )))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
            // The top node's "Buffers: shared hit=… read=… dirtied=…, …"
            // counts every buffer the statement read.
            let buffers: u64 = plan
                .iter()
                .find_map(|line| line.trim().strip_prefix("Buffers: shared "))
                .map(|counts| {
                    counts
                        .split(',')
                        .next()
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|count| match count.split_once('=')? {
                            ("hit" | "read", n) => n.parse::<u64>().ok(),
                            _ => None,
                        })
                        .sum()
                })
                .unwrap_or_else(|| panic!("no buffer counts in {plan:#?}"));
            assert!(buffers < 500, "{buffers} buffers: {plan:#?}");
        }
        drop(conn);
        pool.close().await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
}
