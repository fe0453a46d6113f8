//! Overload: is it answered, not absorbed?
//!
//! First the normal load (N orders, C at a time) gives the rate the system
//! sustains and its latency. Then orders are offered open-loop at `factor`
//! times that rate for a fixed time, each one a CreateOrder that waits for
//! its saga, whether or not earlier ones came back, as real clients do. A
//! system that sheds load admits about what it sustains, at about its normal
//! latency, and refuses the rest at once (RESOURCE_EXHAUSTED); one that
//! absorbs it queues everything and every latency grows.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use ordersaga_proto::client::OrderClient;
use serde::Serialize;
use tonic::Code;

use crate::{
    BenchConfig,
    cpu::{self, Target},
    run, setup,
};

/// Connections per OrderService address: an HTTP/2 connection carries a
/// bounded number of streams (the server's setting), and calls past it
/// would wait in this client, where they would count as the server's
/// latency.
const CONNECTIONS_PER_ADDRESS: usize = 8;

#[derive(Debug, Serialize)]
pub struct OverloadReport {
    /// The normal load: sustained sagas/s and latency at C.
    pub normal_sagas_per_s: f64,
    pub normal_p50_ms: f64,
    pub normal_p99_ms: f64,
    /// What was offered.
    pub offered_per_s: f64,
    pub offered: u64,
    pub seconds: f64,
    /// What was admitted: orders that ran to their end, per second of the
    /// run, and their latency (creation to terminal).
    pub admitted: u64,
    pub admitted_per_s: f64,
    pub admitted_p50_ms: f64,
    pub admitted_p99_ms: f64,
    /// admitted p99 ÷ normal p99 (aim: ≤ 2).
    pub p99_ratio: f64,
    /// Refused with RESOURCE_EXHAUSTED, and how fast.
    pub refused: u64,
    pub refused_share: f64,
    pub refusal_p50_ms: f64,
    pub refusal_p99_ms: f64,
    pub refusal_max_ms: f64,
    /// Any other failure, by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// CPU each process used while the load was offered, in cores (CPU
    /// seconds per second): what the load generator itself took from the
    /// machine shows here, beside what the system did.
    pub cpu_cores: BTreeMap<&'static str, f64>,
}

impl OverloadReport {
    pub fn print(&self) {
        println!(
            "normal load:  {:.1} sagas/s, p50 {:.1} ms, p99 {:.1} ms",
            self.normal_sagas_per_s, self.normal_p50_ms, self.normal_p99_ms
        );
        println!(
            "offered:      {} orders in {:.1} s ({:.1}/s, {:.1}× normal)",
            self.offered,
            self.seconds,
            self.offered_per_s,
            self.offered_per_s / self.normal_sagas_per_s.max(f64::MIN_POSITIVE)
        );
        println!(
            "admitted:     {} ({:.1}/s), p50 {:.1} ms, p99 {:.1} ms ({:.2}× the normal p99; aim ≤ 2)",
            self.admitted,
            self.admitted_per_s,
            self.admitted_p50_ms,
            self.admitted_p99_ms,
            self.p99_ratio
        );
        println!(
            "refused:      {} ({:.1} %), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (aim: < 5 ms)",
            self.refused,
            self.refused_share * 100.0,
            self.refusal_p50_ms,
            self.refusal_p99_ms,
            self.refusal_max_ms
        );
        if !self.cpu_cores.is_empty() {
            let cores = cpu::describe(&self.cpu_cores, "");
            println!("cpu (cores) while offered: {cores}");
        }
        if !self.errors.is_empty() {
            println!("other errors: {:?}", self.errors);
        }
    }
}

#[derive(Default)]
struct Tally {
    admitted: Option<Histogram<u64>>,
    refusals: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    last_admitted: Option<Instant>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// How much to offer after the normal run.
#[derive(Debug, Clone, Copy)]
pub enum Offer {
    /// This many times the rate the normal run sustained.
    Factor(f64),
    /// This many orders per second, whatever the normal run sustained.
    Rate(f64),
}

/// The normal run, then what `offer` says for `seconds`. The CPU of
/// `targets` is accounted over the offered load.
pub async fn run(
    config: &BenchConfig,
    offer: Offer,
    seconds: u64,
    targets: &[Target],
) -> anyhow::Result<OverloadReport> {
    match offer {
        Offer::Factor(factor) => anyhow::ensure!(factor > 0.0, "--factor must be above 0"),
        Offer::Rate(rate) => anyhow::ensure!(rate > 0.0, "--rate must be above 0"),
    }
    let world = setup::prepare(config).await?;
    let normal = run::orders(config, &world).await?;
    let finished: u64 = normal.outcomes.values().sum();
    anyhow::ensure!(
        finished > 0,
        "the normal load finished no order: {normal:?}"
    );
    let sustained = finished as f64 / normal.elapsed.as_secs_f64();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let offered_per_s = match offer {
        Offer::Factor(factor) => sustained * factor,
        Offer::Rate(rate) => rate,
    };
    let offered = (offered_per_s * seconds as f64).ceil() as u64;

    // A world of its own, with stock and money for every order offered.
    let sized = BenchConfig {
        orders: offered,
        ..config.clone()
    };
    let world = setup::prepare(&sized).await?;
    let mut clients: Vec<OrderClient> = vec![];
    for _ in 0..CONNECTIONS_PER_ADDRESS {
        clients.extend(config.order_clients().await?);
    }
    let tally = Arc::new(Mutex::new(Tally {
        admitted: Some(histogram()),
        refusals: Some(histogram()),
        ..Tally::default()
    }));
    let period = Duration::from_secs_f64(1.0 / offered_per_s);
    let cpu_before = cpu::sample(targets);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(offered as usize);
    for i in 0..offered {
        // Open loop: order i leaves at its time, however the others fare.
        tokio::time::sleep_until((started + period.mul_f64(i as f64)).into()).await;
        let request = run::order_request(&world, i, config.compensate_share);
        let (client, tally) = (clients[i as usize % clients.len()].clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let answer = client
                .create_order_and_wait(request, Duration::from_secs(60))
                .await;
            let micros = (t0.elapsed().as_micros() as u64).max(1);
            let mut tally = tally.lock().unwrap();
            match answer {
                Ok(_) => {
                    let _ = tally.admitted.as_mut().map(|h| h.record(micros));
                    tally.last_admitted = Some(Instant::now());
                }
                Err(status) if status.code() == Code::ResourceExhausted => {
                    let _ = tally.refusals.as_mut().map(|h| h.record(micros));
                }
                Err(status) => {
                    *tally
                        .errors
                        .entry(format!("{:?}", status.code()))
                        .or_default() += 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    let cpu_cores = cpu::per_unit(&cpu_before, &cpu::sample(targets), wall_ms);
    let tally = Arc::try_unwrap(tally)
        .map_err(|_| anyhow::anyhow!("a call outlived the run"))?
        .into_inner()
        .unwrap();
    let admitted = tally.admitted.unwrap_or_else(histogram);
    let refusals = tally.refusals.unwrap_or_else(histogram);
    let span = tally
        .last_admitted
        .map_or(Duration::from_secs(seconds), |last| last - started);
    let normal_p99 = ms(&normal.latency, 0.99);
    Ok(OverloadReport {
        normal_sagas_per_s: sustained,
        normal_p50_ms: ms(&normal.latency, 0.5),
        normal_p99_ms: normal_p99,
        offered_per_s,
        offered,
        seconds: seconds as f64,
        admitted: admitted.len(),
        admitted_per_s: admitted.len() as f64 / span.as_secs_f64().max(f64::MIN_POSITIVE),
        admitted_p50_ms: ms(&admitted, 0.5),
        admitted_p99_ms: ms(&admitted, 0.99),
        p99_ratio: ms(&admitted, 0.99) / normal_p99.max(f64::MIN_POSITIVE),
        refused: refusals.len(),
        refused_share: refusals.len() as f64 / offered.max(1) as f64,
        refusal_p50_ms: ms(&refusals, 0.5),
        refusal_p99_ms: ms(&refusals, 0.99),
        refusal_max_ms: refusals.max() as f64 / 1000.0,
        errors: tally.errors,
        cpu_cores,
    })
}
