//! Serving one business service the way every service of the system is served.
//!
//! Beside the business service, every server carries `grpc.health.v1` and server
//! reflection (v1 and v1alpha, since older grpcurl asks for v1alpha); those two
//! need no API key, so `grpcurl -plaintext HOST:PORT list` works out of the box.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::Context;
use futures::StreamExt;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    body::Body,
    server::NamedService,
    transport::{Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;
use tower::Service;

use crate::{
    auth::RequireKey,
    fault::FaultLayer,
    metrics::{FrozenMetrics, GrpcMetricsLayer, MetricsRegistry},
    settings::ServerArgs,
    shed::ShedLayer,
    store::{Migrations, Store},
};

/// A bound, ready-to-run service. Binding happens in `build`, so `port()` is
/// known before the server runs (tests bind port 0).
pub struct App<S> {
    listener: TcpListener,
    metrics_listener: TcpListener,
    metrics: Arc<FrozenMetrics>,
    grpc_metrics: GrpcMetricsLayer,
    service: S,
    tls: Option<ServerTlsConfig>,
    args: ServerArgs,
}

impl<S, B> App<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Binds gRPC on `args.host:args.port` (or `default_port`) and metrics on
    /// `args.metrics_port` (or `default_metrics_port`). `metrics` holds the
    /// service's own metrics; the gRPC ones are added here.
    pub async fn bind(
        args: ServerArgs,
        default_port: u16,
        default_metrics_port: u16,
        service: S,
        mut metrics: MetricsRegistry,
    ) -> anyhow::Result<Self> {
        let addr = SocketAddr::new(args.host, args.port.unwrap_or(default_port));
        let listener = listen(addr).with_context(|| format!("cannot listen on {addr}"))?;
        let metrics_addr =
            SocketAddr::new(args.host, args.metrics_port.unwrap_or(default_metrics_port));
        let metrics_listener = listen(metrics_addr)
            .with_context(|| format!("cannot listen on {metrics_addr} (METRICS_PORT)"))?;
        let grpc_metrics = metrics.grpc_layer();
        Ok(App {
            listener,
            metrics_listener,
            metrics: metrics.freeze(),
            grpc_metrics,
            service,
            tls: args.tls.server_config()?,
            args,
        })
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting, reports NOT_SERVING
    /// and waits for in-flight calls to finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(S::NAME, ServingStatus::Serving)
            .await;
        // One signal, two servers: gRPC and /metrics.
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            stop.send_replace(true);
        });
        let until = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let metrics_server = tokio::spawn(crate::metrics::serve(
            self.metrics_listener,
            self.metrics,
            until(),
        ));
        let grpc_stopped = until();
        let drain = async move {
            grpc_stopped.await;
            health
                .set_service_status(S::NAME, ServingStatus::NotServing)
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
        };

        let incoming = TcpListenerStream::new(self.listener).map(|conn| {
            // Small unary messages: don't let Nagle hold them back.
            conn.inspect(|stream| {
                let _ = stream.set_nodelay(true);
            })
        });

        tracing::info!(
            service = S::NAME,
            addr = %self.args.host,
            faults = self.args.faults.is_active(),
            tls = self.tls.is_some(),
            mtls = self.args.tls.tls_client_ca.is_some(),
            "serving"
        );
        let mut server = Server::builder();
        if let Some(tls) = self.tls {
            server = server.tls_config(tls)?;
        }
        server
            // Server-side deadline; tonic answers CANCELLED when it fires.
            .timeout(self.args.request_timeout())
            // A server span per call, child of the caller's span (W3C traceparent).
            .trace_fn(crate::propagation::server_span)
            // h2's own rapid-reset defence stays as it is: a connection that
            // resets 20 streams before the server accepted them is closed
            // (GOAWAY). The orchestrator never needs more: it does not open a
            // stream it is about to give up on (orchestrator::downstream::DeadlineCap).
            // Latency and status code per method, for /metrics (refusals included).
            .layer(self.grpc_metrics)
            // Past the limit of calls in flight, RESOURCE_EXHAUSTED at once.
            .layer(ShedLayer::new(self.args.max_concurrent_calls as usize))
            // Opt-in fault injection around every business call (never health or reflection).
            .layer(FaultLayer::new(self.args.faults.clone()))
            .add_service(health_service)
            .add_service(reflection_v1(S::NAME)?)
            .add_service(reflection_v1alpha(S::NAME)?)
            .add_service(self.service)
            .serve_with_incoming_shutdown(incoming, drain)
            .await
            .context("the gRPC server failed")?;
        metrics_server.await?.context("the metrics server failed")?;
        tracing::info!(service = S::NAME, "drained and stopped");
        Ok(())
    }
}

/// Binds with SO_REUSEADDR: the default ports (50051-50054) lie inside Linux's
/// ephemeral range, so a client connection's TIME_WAIT on such a port must not
/// stop a restart.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Where a service listens and keeps its data unless told otherwise.
pub struct Defaults {
    pub port: u16,
    pub metrics_port: u16,
    pub database_url: &'static str,
}

/// What every domain service does at start-up: open (and migrate) its store,
/// put the API key check in front of its business service, register the pool
/// metrics, and bind its ports.
pub async fn start_domain_service<S, B>(
    args: ServerArgs,
    defaults: &Defaults,
    migrations: &Migrations,
    make_service: impl FnOnce(Store) -> S,
) -> anyhow::Result<App<RequireKey<S>>>
where
    RequireKey<S>: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    <RequireKey<S> as Service<http::Request<Body>>>::Future: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    args.check_unsafe(&[])?;
    let keys = args.keys()?;
    args.tls.server_config()?;
    let url = args
        .database_url
        .clone()
        .unwrap_or_else(|| defaults.database_url.to_owned());
    args.durability.announce();
    let store = Store::open_with_batch_writer(&url, migrations, args.durability).await?;
    let mut metrics = MetricsRegistry::default();
    metrics.register_pool(store.pool.clone());
    if let Some(shared) = &store.shared {
        metrics.register_shared_transaction(shared.clone());
    }
    if let Some(writer) = &store.writer {
        metrics.register_batch_writer(writer.clone());
    }
    let service = RequireKey::new(make_service(store), keys);
    App::bind(args, defaults.port, defaults.metrics_port, service, metrics).await
}

/// A service binary's whole life: logs and traces under `service_name`, then
/// build, serve until SIGTERM or SIGINT, and drain.
pub async fn run_until_signal<S, B>(
    service_name: &'static str,
    log_json: bool,
    build: impl Future<Output = anyhow::Result<App<S>>>,
) -> anyhow::Result<()>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _telemetry = crate::telemetry::init(service_name, log_json)?;
    let app = build.await?;
    app.run_until_stopped(crate::shutdown::signal()).await
}

/// The largest request message any service decodes. The largest valid
/// request (a CreateOrder with 100 lines of 128-byte SKUs and a full
/// address) is about 20 KiB; tonic's default of 4 MiB let any caller make a
/// service allocate and parse 4 MiB before validation refused it.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

// The descriptor set holds every package of the system; list only what this
// server serves. The reflection builder is not `Clone`, hence one per version.
fn reflection_v1(
    service: &'static str,
) -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ordersaga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service)
        .with_service_name(HEALTH_SERVICE)
        .build_v1()?)
}

fn reflection_v1alpha(
    service: &'static str,
) -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ordersaga_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service)
        .with_service_name(HEALTH_SERVICE)
        .build_v1alpha()?)
}
