//! orderbench: drives N orders at concurrency C through a running
//! OrderService, each created with `wait` so it returns at its terminal state.
//!
//! - [`setup`]: a fresh SKU and fresh accounts per run, so runs never interfere.
//! - [`run`]: the load, with an HDR latency histogram and outcome counts.
//! - [`check`]: conservation through the services' read RPCs, and the outcome mix.
//! - [`echo`]: the RPC ceiling, a tonic unary call at the same concurrency.
//! - [`cpu`]: CPU time per process from `/proc`, for the CPU one saga costs each.

pub mod check;
pub mod cpu;
pub mod echo;
pub mod overload;
pub mod report;
pub mod run;
pub mod setup;

/// Where the system under test is, and how to load it.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The OrderService; replicas separated by commas.
    pub orders_addr: String,
    pub stock_addr: String,
    pub payment_addr: String,
    pub api_key: String,
    /// For the run's Restock and Deposit.
    pub admin_key: String,
    pub orders: u64,
    pub concurrency: usize,
    /// Share of orders placed by a customer who can't pay (they compensate).
    pub compensate_share: f64,
    pub progress: bool,
}

impl BenchConfig {
    /// One client per OrderService replica in `orders_addr`.
    pub async fn order_clients(&self) -> anyhow::Result<Vec<ordersaga_proto::client::OrderClient>> {
        let mut clients = vec![];
        for addr in self.orders_addr.split(',').filter(|a| !a.trim().is_empty()) {
            clients.push(
                ordersaga_proto::client::OrderClient::connect(
                    addr.trim().to_owned(),
                    &self.api_key,
                )
                .await?,
            );
        }
        anyhow::ensure!(!clients.is_empty(), "no OrderService address given");
        Ok(clients)
    }
}
