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
pub mod report;
pub mod run;
pub mod setup;

/// Where the system under test is, and how to load it.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub orders_addr: String,
    pub stock_addr: String,
    pub payment_addr: String,
    pub api_key: String,
    pub orders: u64,
    pub concurrency: usize,
    /// Share of orders placed by a customer who can't pay (they compensate).
    pub compensate_share: f64,
    pub progress: bool,
}
