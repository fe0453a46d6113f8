//! The figures, for people and for scripts.

use serde::Serialize;

use crate::{BenchConfig, check::Verdict, run::LoadResult};

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
    pub errors: std::collections::BTreeMap<String, u64>,
    pub conservation: &'static str,
    pub failures: Vec<String>,
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
            errors: load.errors.clone(),
            conservation: if verdict.passed() { "PASS" } else { "FAIL" },
            failures: verdict.failures.clone(),
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
        println!("conservation {}", self.conservation);
        for failure in &self.failures {
            println!("  - {failure}");
        }
    }
}
