//! Prometheus metrics: one registry per service, served as text at `/metrics`
//! on the service's own HTTP port.
//!
//! The kit registers what every service has: gRPC latency and codes per method
//! (a tower layer) and database pool use (read at scrape time). A service adds
//! its own (the orchestrator: sagas and steps) before it binds.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use sqlx::AnyPool;

use crate::{batch_writer::BatchWriter, shared_transaction::SharedTransaction};
use tower::{Layer, Service};

/// Latency buckets from 0.25 ms to ~8 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 16)
}

/// A registry being filled, plus what must be refreshed before each scrape.
#[derive(Default)]
pub struct MetricsRegistry {
    pub registry: Registry,
    refreshers: Vec<Box<dyn Fn() + Send + Sync>>,
}

impl MetricsRegistry {
    /// Registers gauges of the store's connection pool, read at scrape time.
    pub fn register_pool(&mut self, pool: AnyPool) {
        let connections = Family::<StateLabels, Gauge>::default();
        self.registry.register(
            "db_pool_connections",
            "Connections of the store's pool, by state (idle, in_use)",
            connections.clone(),
        );
        let max = Gauge::<i64>::default();
        self.registry.register(
            "db_pool_max_connections",
            "Most connections the pool may open",
            max.clone(),
        );
        max.set(i64::from(pool.options().get_max_connections()));
        self.refreshers.push(Box::new(move || {
            let size = i64::from(pool.size());
            let idle = pool.num_idle() as i64;
            connections
                .get_or_create(&StateLabels { state: "idle" })
                .set(idle);
            connections
                .get_or_create(&StateLabels { state: "in_use" })
                .set(size - idle);
        }));
    }

    /// Registers the counters of PostgreSQL's shared transaction, read at
    /// scrape time: its commits, its turns redone, and the requests that
    /// ran alone or were written by a combined statement (the rest took a
    /// turn each).
    pub fn register_shared_transaction(&mut self, shared: SharedTransaction) {
        let commits = Counter::<u64>::default();
        self.registry.register(
            "db_shared_transaction_commits",
            "Batches of hot requests committed on the shared transaction (PostgreSQL)",
            commits.clone(),
        );
        let requests = Family::<HowLabels, Counter>::default();
        self.registry.register(
            "db_shared_transaction_requests",
            "Hot requests that ran alone (their statement committing by itself) or were \
             written by a statement combining many (PostgreSQL)",
            requests.clone(),
        );
        let redone = Counter::<u64>::default();
        self.registry.register(
            "db_shared_transaction_turns_redone",
            "Requests run again on the shared transaction because a neighbour's turn failed \
             without a savepoint, or was dropped midway, and rolled their batch back (PostgreSQL)",
            redone.clone(),
        );
        let seen = std::sync::Mutex::new((0u64, 0u64, 0u64, 0u64));
        self.refreshers.push(Box::new(move || {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            let now = (
                shared.commits(),
                shared.alone(),
                shared.combined(),
                shared.redone(),
            );
            commits.inc_by(now.0 - seen.0);
            redone.inc_by(now.3 - seen.3);
            requests
                .get_or_create(&HowLabels { how: "alone" })
                .inc_by(now.1 - seen.1);
            requests
                .get_or_create(&HowLabels { how: "combined" })
                .inc_by(now.2 - seen.2);
            *seen = now;
        }));
    }

    /// Registers the counter of a SQLite file's batch writer, read at scrape
    /// time: its waits at a file another connection held locked, which the
    /// writer's gate should make none.
    pub fn register_batch_writer(&mut self, writer: BatchWriter) {
        let waits = Counter::<u64>::default();
        self.registry.register(
            "db_batch_writer_busy_waits",
            "Times the SQLite batch writer found its file locked by another connection and \
             slept before trying again (SQLite)",
            waits.clone(),
        );
        let seen = std::sync::atomic::AtomicU64::new(0);
        self.refreshers.push(Box::new(move || {
            // Two scrapes may refresh at once: the later count wins, and
            // neither adds what the other did.
            let now = writer.busy_waits();
            let before = seen.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
            waits.inc_by(now.saturating_sub(before));
        }));
    }

    /// Registers the gRPC server metrics and returns the layer that records them.
    pub fn grpc_layer(&mut self) -> GrpcMetricsLayer {
        let handled = Family::<MethodCodeLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        self.registry.register(
            "grpc_server_handled",
            "gRPC calls completed, by method and status code",
            handled.clone(),
        );
        self.registry.register(
            "grpc_server_handling_seconds",
            "Time to answer a gRPC call, by method",
            latency.clone(),
        );
        GrpcMetricsLayer {
            metrics: Arc::new(GrpcMetrics { handled, latency }),
        }
    }

    pub fn freeze(self) -> Arc<FrozenMetrics> {
        Arc::new(FrozenMetrics {
            registry: self.registry,
            refreshers: self.refreshers,
        })
    }
}

/// The finished registry, encoded on each scrape.
pub struct FrozenMetrics {
    registry: Registry,
    refreshers: Vec<Box<dyn Fn() + Send + Sync>>,
}

impl FrozenMetrics {
    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        for refresh in &self.refreshers {
            refresh();
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding to a String cannot fail");
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabels {
    how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCodeLabels {
    method: String,
    code: String,
}

pub(crate) struct GrpcMetrics {
    handled: Family<MethodCodeLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
}

impl GrpcMetrics {
    /// One call (or batch item) of `method` answered with `code` after `elapsed`.
    pub(crate) fn record(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
        self.handled
            .get_or_create(&MethodCodeLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// Records latency and status code of every business call.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<GrpcMetrics>,
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        // Only the contract's methods get series of their own (see
        // `crate::methods`): a raw path would let anyone grow them.
        let path = request.uri().path();
        let health = path.starts_with("/grpc.");
        let method = crate::methods::label(path).to_owned();
        if crate::methods::is_batch(path) {
            // Each item is counted under its own method, as its call would be.
            request
                .extensions_mut()
                .get_or_insert_default::<crate::batch::ItemHooks>()
                .metrics = Some(metrics.clone());
        }
        Box::pin(async move {
            let started = Instant::now();
            let response = inner.call(request).await?;
            if !health {
                // A failed unary call carries its status in the headers
                // (trailers-only); a success carries it in the trailers.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok);
                metrics.record(&method, code, started.elapsed());
            }
            Ok(response)
        })
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<FrozenMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
