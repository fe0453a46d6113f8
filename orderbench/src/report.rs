//! The figures, for people and for scripts.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{BenchConfig, check::Verdict, echo::EchoReport, run::LoadResult};

/// This machine's RPC ceiling, measured in the same invocation, and the run's
/// figures as ratios to it (the speed goals are stated as such ratios, since
/// absolute figures vary threefold from day to day on shared machines).
#[derive(Debug, Serialize)]
pub struct Ceiling {
    /// Echo p50 at C=1: the mean of the measurements before and after the run.
    pub echo_p50_ms_c1: f64,
    /// Echo calls/s at the run's concurrency: the mean of the two.
    pub echo_calls_per_s: f64,
    /// Each measurement apart, before the run and after it: how far this
    /// machine's speed moved while the run went on.
    pub echo_p50_ms_c1_before_after: [f64; 2],
    pub echo_calls_per_s_before_after: [f64; 2],
    /// Echo calls/s ÷ sagas/s (goal: ≤ 16, aim ≤ 8).
    pub throughput_ratio: f64,
    /// Saga p50 ÷ echo p50 at C=1 (goal at C=1: ≤ 15).
    pub latency_ratio: f64,
}

/// The echo ceiling at C=1 and at the run's concurrency, measured once.
pub struct EchoPair {
    pub c1: EchoReport,
    pub at_c: EchoReport,
}

impl Ceiling {
    /// The ratios to the mean of the ceilings measured `before` and `after`
    /// the run: on a machine whose speed drifts by a third within minutes,
    /// one measurement before a long run can be far from the run's own.
    pub fn new(before: &EchoPair, after: &EchoPair, sagas_per_s: f64, p50_ms: f64) -> Ceiling {
        let p50 = [before.c1.p50_ms, after.c1.p50_ms];
        let calls = [before.at_c.calls_per_s, after.at_c.calls_per_s];
        let echo_p50_ms_c1 = (p50[0] + p50[1]) / 2.0;
        let echo_calls_per_s = (calls[0] + calls[1]) / 2.0;
        Ceiling {
            echo_p50_ms_c1,
            echo_calls_per_s,
            echo_p50_ms_c1_before_after: p50,
            echo_calls_per_s_before_after: calls,
            throughput_ratio: echo_calls_per_s / sagas_per_s.max(f64::MIN_POSITIVE),
            latency_ratio: p50_ms / echo_p50_ms_c1.max(f64::MIN_POSITIVE),
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
            let [p50_before, p50_after] = c.echo_p50_ms_c1_before_after;
            let [calls_before, calls_after] = c.echo_calls_per_s_before_after;
            println!(
                "ceiling     echo p50 at C=1 {:.3} ms ({p50_before:.3} before the run, {p50_after:.3} after); \
                 echo at C={} {:.0} calls/s ({calls_before:.0} before, {calls_after:.0} after)",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(concurrency: usize, calls_per_s: f64, p50_ms: f64) -> EchoReport {
        EchoReport {
            calls: 1_000,
            concurrency,
            calls_per_s,
            p50_ms,
            p99_ms: p50_ms * 2.0,
        }
    }

    /// The ratios are to the mean of the ceiling before and after the run,
    /// and both measurements are kept.
    #[test]
    fn the_ratios_are_to_the_ceilings_mean_before_and_after_the_run() {
        let before = EchoPair {
            c1: echo(1, 9_000.0, 0.1),
            at_c: echo(64, 20_000.0, 1.0),
        };
        let after = EchoPair {
            c1: echo(1, 3_000.0, 0.3),
            at_c: echo(64, 10_000.0, 3.0),
        };
        let ceiling = Ceiling::new(&before, &after, 1_000.0, 3.0);
        assert_eq!(ceiling.echo_p50_ms_c1_before_after, [0.1, 0.3]);
        assert_eq!(ceiling.echo_calls_per_s_before_after, [20_000.0, 10_000.0]);
        assert!((ceiling.echo_p50_ms_c1 - 0.2).abs() < 1e-9);
        assert!((ceiling.echo_calls_per_s - 15_000.0).abs() < 1e-9);
        assert!((ceiling.throughput_ratio - 15.0).abs() < 1e-9);
        assert!((ceiling.latency_ratio - 15.0).abs() < 1e-9);
    }
}
