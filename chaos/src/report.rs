//! What a run prints: the faults by kind, the orders that crossed a crash and
//! how long they took after it, the lost, doubled and stuck counts, and the
//! audit's verdict.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tokio::time::Instant;

use crate::{audit::Audit, load::ClientRecord, schedule::Fault, system::StoreKind};

/// A fault as it struck.
#[derive(Debug, Clone)]
pub struct Injected {
    pub fault: Fault,
    pub at: Instant,
    /// How long the injection itself took (a kill: until the victim was
    /// back, for PostgreSQL until it took connections again).
    pub back_after: Duration,
}

#[derive(Debug)]
pub struct Report {
    pub store: StoreKind,
    pub seed: u64,
    /// Orders in the orchestrator's store.
    pub orders: u64,
    pub concurrency: usize,
    pub load_secs: f64,
    pub injected: Vec<Injected>,
    pub clients: Vec<ClientRecord>,
    pub audit: Audit,
    /// Where the logs and stores of a failed run were kept.
    pub kept: Option<PathBuf>,
    /// The processes whose log says they ran with relaxed commits
    /// (`DURABILITY=relaxed`), by log name: what a relaxed run tested.
    pub relaxed: Vec<String>,
}

/// The orders that were in flight when one kind of crash struck.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Crossing {
    pub orders: u64,
    /// The longest time from a crash to the end of an order that crossed it.
    pub longest: Duration,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.audit.passed()
    }

    /// Per kind of kill: the orders in flight at one of its crashes, and the
    /// longest time from such a crash to the end of the order.
    pub fn crossings(&self) -> BTreeMap<&'static str, Crossing> {
        let mut crossings: BTreeMap<&'static str, Crossing> = BTreeMap::new();
        for injected in &self.injected {
            if !matches!(injected.fault, Fault::Kill(_)) {
                continue;
            }
            let crossing = crossings.entry(injected.fault.kind()).or_default();
            for client in &self.clients {
                let Some(ended) = client.ended else { continue };
                if client.started < injected.at && injected.at < ended {
                    crossing.orders += 1;
                    crossing.longest = crossing.longest.max(ended - injected.at);
                }
            }
        }
        crossings
    }

    /// Orders in flight at any crash.
    pub fn orders_crossing_a_crash(&self) -> usize {
        self.clients
            .iter()
            .filter(|client| {
                let ended = client.ended.unwrap_or_else(Instant::now);
                self.injected.iter().any(|i| {
                    matches!(i.fault, Fault::Kill(_)) && client.started < i.at && i.at < ended
                })
            })
            .count()
    }

    /// p50, p99 and max of the time from an order's first call to the
    /// terminal status its client saw: what the faults cost with or without
    /// a crash, to read the crossing times against.
    pub fn order_latency(&self) -> (Duration, Duration, Duration) {
        let mut latencies: Vec<Duration> = self
            .clients
            .iter()
            .filter_map(|c| Some(c.ended? - c.started))
            .collect();
        latencies.sort();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        (
            at(0.5),
            at(0.99),
            latencies.last().copied().unwrap_or_default(),
        )
    }

    pub fn print(&self) {
        println!(
            "\nchaos run on {}: seed {}, {} orders at C={}, load {:.1} s",
            self.store, self.seed, self.orders, self.concurrency, self.load_secs
        );
        let mut by_kind: BTreeMap<&str, (u64, Duration)> = BTreeMap::new();
        for injected in &self.injected {
            let entry = by_kind.entry(injected.fault.kind()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(injected.back_after);
        }
        let crossings = self.crossings();
        println!(
            "\n| fault | injected | orders in flight at it | longest crash → end of such an order | longest restart |"
        );
        println!("|---|---|---|---|---|");
        for (kind, (count, back)) in &by_kind {
            match crossings.get(kind) {
                Some(crossing) => println!(
                    "| {kind} | {count} | {} | {:.2} s | {:.2} s |",
                    crossing.orders,
                    crossing.longest.as_secs_f64(),
                    back.as_secs_f64()
                ),
                None => println!("| {kind} | {count} | – | – | – |"),
            }
        }
        let calls: u64 = self.clients.iter().map(|c| u64::from(c.calls)).sum();
        let (p50, p99, max) = self.order_latency();
        println!(
            "\norder latency (first call to terminal status): p50 {:.3} s, p99 {:.3} s, max {:.3} s",
            p50.as_secs_f64(),
            p99.as_secs_f64(),
            max.as_secs_f64()
        );
        println!(
            "\norders: {} ({}), {} crossed a crash; client calls: {calls}",
            self.orders,
            self.audit
                .outcomes
                .iter()
                .map(|(status, n)| format!("{status} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.orders_crossing_a_crash(),
        );
        println!(
            "lost {}, doubled {}, stuck {}, events lost {} (redelivered and dropped by message_id: {})",
            self.audit.lost,
            self.audit.doubled,
            self.audit.stuck,
            self.audit.events_lost,
            self.audit.events_redelivered
        );
        if self.passed() {
            println!("audit: PASS");
        } else {
            println!(
                "audit: FAIL ({} violations; seed {}):",
                self.audit.violations.len(),
                self.seed
            );
            for violation in self.audit.violations.iter().take(25) {
                println!("  - {violation}");
            }
            if let Some(kept) = &self.kept {
                println!("logs and stores kept in {}", kept.display());
            }
        }
    }
}
