//! The load: N orders, C at a time, each waited on to its terminal state.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use ordersaga_proto::orders::v1::{CreateOrderRequest, OrderItem, OrderStatus, ShippingAddress};
use tokio::sync::{Mutex, Semaphore};

use crate::{
    BenchConfig,
    setup::{QUANTITY, World},
};

/// What the load produced.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub elapsed: Duration,
    /// Latency of each order, microseconds.
    pub latency: Histogram<u64>,
    /// Terminal statuses, e.g. "COMPLETED" -> 1800.
    pub outcomes: BTreeMap<String, u64>,
    /// Latency of the orders of each terminal status, microseconds: a
    /// compensated saga makes more calls than a completed one, and the
    /// tail of the whole is mostly theirs.
    pub latency_by_outcome: BTreeMap<String, Histogram<u64>>,
    /// Failed calls by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Orders placed by the customer who can't pay.
    pub expected_compensated: u64,
}

/// Whether order `i` is one of the `share` that must compensate: spread evenly.
pub fn is_poor(i: u64, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

pub async fn orders(config: &BenchConfig, world: &World) -> anyhow::Result<LoadResult> {
    let clients = config.order_clients().await?;
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, (u64, Histogram<u64>)>::new()));
    let errors = Arc::new(Mutex::new(BTreeMap::new()));
    let progress = if config.progress {
        indicatif::ProgressBar::new(config.orders)
    } else {
        indicatif::ProgressBar::hidden()
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} orders  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(config.orders as usize);
    let mut expected_compensated = 0;
    for i in 0..config.orders {
        expected_compensated += u64::from(is_poor(i, config.compensate_share));
        let request = order_request(world, i, config.compensate_share);
        let permit = permits.clone().acquire_owned().await?;
        let (client, latency, outcomes, errors, progress) = (
            clients[i as usize % clients.len()].clone(),
            latency.clone(),
            outcomes.clone(),
            errors.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t0 = Instant::now();
            match client
                .create_order_and_wait(request, Duration::from_secs(60))
                .await
            {
                Ok(order) => {
                    let micros = t0.elapsed().as_micros() as u64;
                    let _ = latency.lock().await.record(micros.max(1));
                    let status = OrderStatus::try_from(order.status)
                        .map(|s| {
                            s.as_str_name()
                                .trim_start_matches("ORDER_STATUS_")
                                .to_owned()
                        })
                        .unwrap_or_else(|_| "UNKNOWN".into());
                    let mut outcomes = outcomes.lock().await;
                    let (count, latency) = outcomes.entry(status).or_insert_with(|| {
                        (
                            0,
                            Histogram::new_with_bounds(1, 600_000_000, 3)
                                .expect("histogram bounds"),
                        )
                    });
                    *count += 1;
                    let _ = latency.record(micros.max(1));
                }
                Err(status) => {
                    *errors
                        .lock()
                        .await
                        .entry(format!("{:?}", status.code()))
                        .or_insert(0) += 1;
                }
            }
            progress.inc(1);
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let latency = latency.lock().await.clone();
    let by_status = outcomes.lock().await.clone();
    let outcomes = by_status
        .iter()
        .map(|(s, (n, _))| (s.clone(), *n))
        .collect();
    let latency_by_outcome = by_status.into_iter().map(|(s, (_, h))| (s, h)).collect();
    let errors = errors.lock().await.clone();
    Ok(LoadResult {
        elapsed,
        latency,
        outcomes,
        latency_by_outcome,
        errors,
        expected_compensated,
    })
}

/// Creates the orders without `wait`: each call returns once the order is
/// recorded. Returns how many were created.
pub async fn flood(config: &BenchConfig, world: &World) -> anyhow::Result<u64> {
    let clients = config.order_clients().await?;
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = Vec::with_capacity(config.orders as usize);
    for i in 0..config.orders {
        let mut request = order_request(world, i, config.compensate_share);
        request.wait = false;
        let permit = permits.clone().acquire_owned().await?;
        let client = clients[i as usize % clients.len()].clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            client.create_order(request).await.is_ok()
        }));
    }
    let mut created = 0;
    for task in tasks {
        created += u64::from(task.await?);
    }
    Ok(created)
}

/// Polls until no saga is RUNNING or COMPENSATING; returns how long it took.
pub async fn drain(config: &BenchConfig, timeout: Duration) -> anyhow::Result<Duration> {
    let client = config.order_clients().await?.remove(0);
    let started = Instant::now();
    loop {
        let open = client
            .list_orders(ordersaga_proto::orders::v1::ListOrdersRequest {
                statuses: vec![
                    OrderStatus::Running as i32,
                    OrderStatus::Compensating as i32,
                ],
                page_size: 1,
                ..Default::default()
            })
            .await?;
        if open.orders.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            anyhow::bail!("sagas still open after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Order `i` of a run: one unit of the run's SKU, by the payer or (for the
/// compensating share) by the customer who can't pay.
pub fn order_request(world: &World, i: u64, share: f64) -> CreateOrderRequest {
    let poor = is_poor(i, share);
    CreateOrderRequest {
        request_id: format!("{}-order-{i}", world.run_id),
        customer_id: if poor {
            world.poor.clone()
        } else {
            world.payer.clone()
        },
        items: vec![OrderItem {
            sku: world.sku.clone(),
            quantity: QUANTITY,
        }],
        shipping_address: Some(ShippingAddress {
            recipient: "Bench Customer".into(),
            line1: "1 Load Street".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "DE".into(),
        }),
        wait: true,
    }
}

#[cfg(test)]
mod tests {
    use super::is_poor;

    #[test]
    fn the_share_is_exact_and_spread() {
        let poor: Vec<u64> = (0..100).filter(|i| is_poor(*i, 0.1)).collect();
        assert_eq!(poor.len(), 10);
        assert_eq!(poor[0], 9);
        assert_eq!((0..7).filter(|i| is_poor(*i, 0.0)).count(), 0);
    }
}
