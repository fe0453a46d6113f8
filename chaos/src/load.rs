//! The clients: N orders, started at an even pace and at most C at a time.
//! Each client retries its order with the same `request_id` through every
//! error until the order is terminal, as a careful user of the API would.

use std::{sync::Arc, time::Duration};

use orderbench::run::{is_poor, order_request};
use ordersaga_proto::{
    client::OrderClient,
    orders::v1::{CreateOrderRequest, OrderStatus},
};
use tokio::{sync::Semaphore, time::Instant};
use tonic::transport::Endpoint;

use crate::world::{POOR_SHARE, World};

/// What one client saw of its order.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    pub request_id: String,
    pub poor: bool,
    pub started: Instant,
    /// When the client saw a terminal status; `None` if it gave up.
    pub ended: Option<Instant>,
    pub order_id: Option<String>,
    /// The terminal status the client saw, e.g. "COMPLETED".
    pub outcome: Option<String>,
    /// Calls it took (1 when nothing failed).
    pub calls: u32,
}

pub struct Load {
    /// The orchestrator's replicas (one or more); a client starts on one and
    /// moves to the next after a failed call, as client-side balancing does.
    pub orchestrator_urls: Vec<String>,
    pub api_key: String,
    pub orders: u64,
    pub concurrency: usize,
    /// The orders are started evenly over this long (0: as fast as C allows).
    pub spread: Duration,
    /// A client gives up on its order after this long.
    pub give_up_after: Duration,
}

pub async fn run(load: &Load, world: &World) -> anyhow::Result<Vec<ClientRecord>> {
    let mut clients = vec![];
    for url in &load.orchestrator_urls {
        let channel = Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        clients.push(OrderClient::from_channel(channel, &load.api_key));
    }
    anyhow::ensure!(!clients.is_empty(), "no orchestrator to load");
    let clients = Arc::new(clients);
    let permits = Arc::new(Semaphore::new(load.concurrency.max(1)));
    let started = Instant::now();
    let pace = load.spread.as_secs_f64() / load.orders.max(1) as f64;
    let mut tasks = Vec::with_capacity(load.orders as usize);
    for i in 0..load.orders {
        tokio::time::sleep_until(started + Duration::from_secs_f64(pace * i as f64)).await;
        let permit = permits.clone().acquire_owned().await?;
        let (clients, request) = (clients.clone(), order_request(world, i, POOR_SHARE));
        let give_up_at = Instant::now() + load.give_up_after;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            drive(
                &clients,
                i as usize,
                request,
                is_poor(i, POOR_SHARE),
                give_up_at,
            )
            .await
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for task in tasks {
        records.push(task.await?);
    }
    Ok(records)
}

async fn drive(
    clients: &[OrderClient],
    first: usize,
    request: CreateOrderRequest,
    poor: bool,
    give_up_at: Instant,
) -> ClientRecord {
    let mut record = ClientRecord {
        request_id: request.request_id.clone(),
        poor,
        started: Instant::now(),
        ended: None,
        order_id: None,
        outcome: None,
        calls: 0,
    };
    let mut backoff = Duration::from_millis(50);
    while Instant::now() < give_up_at {
        // A failed call moves on to the next replica.
        let client = &clients[(first + record.calls as usize) % clients.len()];
        record.calls += 1;
        // The server holds the call at most 5 s; the local bound is for a
        // connection that went silent.
        let call = client.create_order_and_wait(request.clone(), Duration::from_secs(5));
        // An error or a silent connection: retry the same request after a pause.
        if let Ok(Ok(order)) = tokio::time::timeout(Duration::from_secs(8), call).await {
            record.order_id = Some(order.order_id.clone());
            if let Some(outcome) = terminal(order.status) {
                record.outcome = Some(outcome);
                record.ended = Some(Instant::now());
                return record;
            }
            // Not terminal yet: ask again at once, the server waits.
            backoff = Duration::from_millis(50);
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
    record
}

fn terminal(status: i32) -> Option<String> {
    let status = OrderStatus::try_from(status).ok()?;
    matches!(
        status,
        OrderStatus::Completed
            | OrderStatus::Compensated
            | OrderStatus::Failed
            | OrderStatus::Cancelled
    )
    .then(|| status_name(status))
}

/// "COMPLETED" for `ORDER_STATUS_COMPLETED`: the stores' spelling.
pub fn status_name(status: OrderStatus) -> String {
    status
        .as_str_name()
        .trim_start_matches("ORDER_STATUS_")
        .to_owned()
}
