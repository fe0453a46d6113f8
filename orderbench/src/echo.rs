//! The RPC ceiling: an in-process tonic server answering `grpc.health.v1`
//! Check (a trivial unary call) over loopback, driven at concurrency C. A saga
//! needs about four such calls plus its commits.

use std::{sync::Arc, time::Instant};

use hdrhistogram::Histogram;
use tokio::sync::Mutex;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[derive(Debug, serde::Serialize)]
pub struct EchoReport {
    pub calls: u64,
    pub concurrency: usize,
    pub calls_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub async fn ceiling(calls: u64, concurrency: usize) -> anyhow::Result<EchoReport> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let per_worker = calls / concurrency as u64;
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = HealthClient::new(channel.clone());
            let latency = latency.clone();
            tokio::spawn(async move {
                let mut local =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                for _ in 0..per_worker {
                    let t0 = Instant::now();
                    if client.check(HealthCheckRequest::default()).await.is_ok() {
                        let _ = local.record((t0.elapsed().as_micros() as u64).max(1));
                    }
                }
                let _ = latency.lock().await.add(&local);
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let latency = latency.lock().await;
    Ok(EchoReport {
        calls: per_worker * concurrency as u64,
        concurrency,
        calls_per_s: (per_worker * concurrency as u64) as f64 / elapsed,
        p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: latency.value_at_quantile(0.99) as f64 / 1000.0,
    })
}
