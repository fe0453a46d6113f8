//! The engine's Prometheus metrics.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tonic::Code;

use crate::{definition::Phase, log::SagaStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    step: &'static str,
    phase: &'static str,
    code: String,
}

#[derive(Clone)]
pub struct EngineMetrics {
    started: Counter,
    finished: Family<OutcomeLabels, Counter>,
    step_seconds: Family<StepLabels, Histogram>,
    retries: Family<RetryLabels, Counter>,
    in_flight: Gauge,
    taken_over: Counter,
    fenced: Counter,
    checkpoints: Counter,
}

impl Default for EngineMetrics {
    /// Metrics that nobody scrapes (e.g. in tests).
    fn default() -> Self {
        EngineMetrics::register(&mut Registry::default())
    }
}

impl EngineMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = EngineMetrics {
            started: Counter::default(),
            finished: Family::default(),
            step_seconds: Family::new_with_constructor(|| {
                // 0.25 ms to about 8 s, as the services' own RPC latency histograms.
                Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
            }),
            retries: Family::default(),
            in_flight: Gauge::default(),
            taken_over: Counter::default(),
            fenced: Counter::default(),
            checkpoints: Counter::default(),
        };
        registry.register("saga_started", "Sagas started", metrics.started.clone());
        registry.register(
            "saga_finished",
            "Sagas that reached a terminal state, by outcome",
            metrics.finished.clone(),
        );
        registry.register(
            "saga_step_duration_seconds",
            "Time of one step attempt's call, by step and phase",
            metrics.step_seconds.clone(),
        );
        registry.register(
            "saga_step_retries",
            "Step attempts that failed and were retried, by step, phase and gRPC code",
            metrics.retries.clone(),
        );
        registry.register(
            "sagas_in_flight",
            "Sagas being driven now",
            metrics.in_flight.clone(),
        );
        registry.register(
            "saga_taken_over",
            "Sagas this replica took over from replicas whose lease ran out",
            metrics.taken_over.clone(),
        );
        registry.register(
            "saga_fenced",
            "Drivers stopped because another replica had taken their saga over",
            metrics.fenced.clone(),
        );
        registry.register(
            "saga_checkpoints",
            "Checkpoints the drivers committed to the log: each a saga's step results and its move past them",
            metrics.checkpoints.clone(),
        );
        metrics
    }

    /// Checkpoints committed so far: with `saga_finished`, the log commits a
    /// saga costs.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.get()
    }

    pub(crate) fn checkpoint(&self) {
        self.checkpoints.inc();
    }

    pub(crate) fn taken_over(&self, sagas: u64) {
        self.taken_over.inc_by(sagas);
    }

    pub(crate) fn fenced(&self) {
        self.fenced.inc();
    }

    pub(crate) fn started(&self) {
        self.started.inc();
    }

    pub(crate) fn finished(&self, status: SagaStatus) {
        self.finished
            .get_or_create(&OutcomeLabels {
                outcome: status.as_str(),
            })
            .inc();
    }

    pub(crate) fn attempt(&self, step: &'static str, phase: Phase, seconds: f64) {
        self.step_seconds
            .get_or_create(&StepLabels {
                step,
                phase: phase.as_str(),
            })
            .observe(seconds);
    }

    pub(crate) fn retry(&self, step: &'static str, phase: Phase, code: Code) {
        self.retries
            .get_or_create(&RetryLabels {
                step,
                phase: phase.as_str(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Counts a driver in flight until the returned guard drops.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }
}

pub(crate) struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
