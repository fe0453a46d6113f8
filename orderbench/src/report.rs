//! The figures, for people and for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{BenchConfig, check::Verdict, echo::EchoReport, run::LoadResult};

/// This machine's RPC ceiling, measured in the same invocation, and the run's
/// figures as ratios to it (the speed goals are stated as such ratios, since
/// absolute figures vary threefold from day to day on shared machines).
#[derive(Debug, Serialize)]
pub struct Ceiling {
    /// Echo p50 at C=1.
    pub echo_p50_ms_c1: f64,
    /// Echo calls/s at the run's concurrency.
    pub echo_calls_per_s: f64,
    /// Echo calls/s ÷ sagas/s (goal: ≤ 16, aim ≤ 8).
    pub throughput_ratio: f64,
    /// Saga p50 ÷ echo p50 at C=1 (goal at C=1: ≤ 15).
    pub latency_ratio: f64,
}

impl Ceiling {
    pub fn new(c1: &EchoReport, at_c: &EchoReport, sagas_per_s: f64, p50_ms: f64) -> Ceiling {
        Ceiling {
            echo_p50_ms_c1: c1.p50_ms,
            echo_calls_per_s: at_c.calls_per_s,
            throughput_ratio: at_c.calls_per_s / sagas_per_s.max(f64::MIN_POSITIVE),
            latency_ratio: p50_ms / c1.p50_ms.max(f64::MIN_POSITIVE),
        }
    }
}

/// The latency of the orders that ended one way.
#[derive(Debug, Serialize)]
pub struct OutcomeLatency {
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub orders: u64,
    pub concurrency: usize,
    pub elapsed_s: f64,
    pub sagas_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub outcomes: std::collections::BTreeMap<String, u64>,
    /// p50 and p99 of the orders of each terminal status, in ms.
    pub latency_by_outcome: BTreeMap<String, OutcomeLatency>,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub conservation: &'static str,
    pub failures: Vec<String>,
    /// The RPC ceiling and the ratios to it; absent with `--echo-calls 0`.
    pub ceiling: Option<Ceiling>,
    /// CPU milliseconds per saga, by process (orderbench's own listed apart).
    pub cpu_ms_per_saga: BTreeMap<&'static str, f64>,
    /// The same, for each service split by thread name (its tokio workers,
    /// its store's writer thread, the saga log's).
    pub cpu_ms_per_saga_by_thread: BTreeMap<&'static str, BTreeMap<String, f64>>,
}

impl Report {
    pub fn new(config: &BenchConfig, load: &LoadResult, verdict: &Verdict) -> Report {
        let ms = |q: f64| load.latency.value_at_quantile(q) as f64 / 1000.0;
        let finished: u64 = load.outcomes.values().sum();
        Report {
            orders: config.orders,
            concurrency: config.concurrency,
            elapsed_s: load.elapsed.as_secs_f64(),
            sagas_per_s: finished as f64 / load.elapsed.as_secs_f64(),
            p50_ms: ms(0.50),
            p90_ms: ms(0.90),
            p99_ms: ms(0.99),
            max_ms: load.latency.max() as f64 / 1000.0,
            outcomes: load.outcomes.clone(),
            latency_by_outcome: load
                .latency_by_outcome
                .iter()
                .map(|(status, latency)| {
                    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
                    (
                        status.clone(),
                        OutcomeLatency {
                            p50_ms: ms(0.50),
                            p99_ms: ms(0.99),
                        },
                    )
                })
                .collect(),
            errors: load.errors.clone(),
            conservation: if verdict.passed() { "PASS" } else { "FAIL" },
            failures: verdict.failures.clone(),
            ceiling: None,
            cpu_ms_per_saga: BTreeMap::new(),
            cpu_ms_per_saga_by_thread: BTreeMap::new(),
        }
    }

    pub fn print(&self) {
        println!(
            "orders {}  concurrency {}  in {:.2} s",
            self.orders, self.concurrency, self.elapsed_s
        );
        println!(
            "throughput  {:.1} sagas/s (terminal sagas per second)",
            self.sagas_per_s
        );
        println!(
            "latency     p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        );
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("outcomes    {}", outcomes.join("  "));
        let by_outcome: Vec<String> = self
            .latency_by_outcome
            .iter()
            .map(|(k, l)| format!("{k} p50 {:.2} ms p99 {:.2} ms", l.p50_ms, l.p99_ms))
            .collect();
        println!("by outcome  {}", by_outcome.join("  "));
        if self.errors.is_empty() {
            println!("errors      none");
        } else {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            println!("errors      {}", errors.join("  "));
        }
        if let Some(c) = &self.ceiling {
            println!(
                "ceiling     echo p50 at C=1 {:.3} ms; echo at C={} {:.0} calls/s",
                c.echo_p50_ms_c1, self.concurrency, c.echo_calls_per_s
            );
            println!(
                "ratios      echo/s ÷ sagas/s = {:.1} (goal ≤ 16, aim ≤ 8); p50 ÷ echo p50 = {:.1} (goal at C=1 ≤ 15); p99 ÷ p50 = {:.1}",
                c.throughput_ratio,
                c.latency_ratio,
                self.p99_ms / self.p50_ms.max(f64::MIN_POSITIVE)
            );
        }
        if !self.cpu_ms_per_saga.is_empty() {
            let cpu = crate::cpu::describe(&self.cpu_ms_per_saga, " ms");
            println!("cpu/saga    {cpu}");
        }
        if !self.cpu_ms_per_saga_by_thread.is_empty() {
            let threads = crate::cpu::describe_by_thread(&self.cpu_ms_per_saga_by_thread);
            println!("cpu/thread  {threads}");
        }
        println!("conservation {}", self.conservation);
        for failure in &self.failures {
            println!("  - {failure}");
        }
    }
}
