//! Drives sagas: one task per open saga, a bounded number at once.
//!
//! A driver runs the step at its cursor, records the result (and the start of
//! the next step) in one checkpoint, waits for that commit, then moves on. On a
//! definite failure it compensates the done steps in reverse order; when a step's
//! outcome stays unknown after its retry budget, that step is compensated too.
//! Compensations are retried until they succeed; each failed attempt is recorded,
//! so a stuck saga stays visible as COMPENSATING with its last error.
//!
//! After a crash, [`Engine::recover`] restarts every open saga from its cursor in
//! the log. The step at the cursor is sent again with the same `request_id`, and
//! the callee's idempotency makes that safe.

use std::{sync::Arc, time::Duration};

use serde::de::DeserializeOwned;
use sqlx::AnyPool;
use svc_kit::time::now_ms;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio_util::task::TaskTracker;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    crash_points::{self, point},
    outbox::NewEvent,
};

use super::{
    definition::{Call, Milestone, Phase, SagaDefinition, Step},
    log::{self, Applied, Checkpoint, LogWriter, SagaState, SagaStatus, StepRecord, StepStatus},
    metrics::EngineMetrics,
    retry::{RetryPolicy, is_transient},
};

/// A committed change of a saga, as broadcast to waiters and watchers.
#[derive(Debug, Clone, Copy)]
pub struct SagaChange {
    pub saga_id: Uuid,
    /// The saga's status after the change, when the change set it.
    pub status: Option<SagaStatus>,
}

/// Where a driver is: the saga's state as last committed.
#[derive(Debug, Clone)]
struct Cursor {
    status: SagaStatus,
    next_step: i64,
    cancel_requested: bool,
    failure_reason: String,
}

enum ForwardOutcome {
    Succeeded {
        output: String,
        attempts: u32,
        last_error: String,
    },
    Failed {
        status: Status,
        attempts: u32,
    },
    Unknown {
        attempts: u32,
        last_error: String,
    },
}

/// The driver stopped because the process is shutting down; recovery resumes it.
struct Interrupted;

pub struct Engine<D> {
    inner: Arc<Inner<D>>,
}

impl<D> Clone for Engine<D> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<D> {
    definition: SagaDefinition<D>,
    pool: AnyPool,
    log: LogWriter,
    policy: RetryPolicy,
    /// Bounds the sagas driven at once; the rest wait for a permit.
    permits: Semaphore,
    changes: broadcast::Sender<SagaChange>,
    stopping: watch::Sender<bool>,
    drivers: TaskTracker,
    metrics: EngineMetrics,
}

impl<D> Engine<D>
where
    D: DeserializeOwned + Send + Sync + 'static,
{
    pub fn new(
        definition: SagaDefinition<D>,
        pool: AnyPool,
        policy: RetryPolicy,
        max_in_flight: usize,
        metrics: EngineMetrics,
    ) -> Self {
        let (changes, _) = broadcast::channel(16 * 1024);
        Engine {
            inner: Arc::new(Inner {
                log: LogWriter::spawn(pool.clone()),
                definition,
                pool,
                policy,
                permits: Semaphore::new(max_in_flight),
                changes,
                stopping: watch::channel(false).0,
                drivers: TaskTracker::new(),
                metrics,
            }),
        }
    }

    pub fn definition(&self) -> &SagaDefinition<D> {
        &self.inner.definition
    }

    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// Every committed change of any saga. Receivers that lag should re-read
    /// what they watch.
    pub fn subscribe(&self) -> broadcast::Receiver<SagaChange> {
        self.inner.changes.subscribe()
    }

    /// Tells watchers that a saga changed outside a driver (e.g. a cancel request).
    pub fn notify(&self, saga_id: Uuid) {
        let _ = self.inner.changes.send(SagaChange {
            saga_id,
            status: None,
        });
    }

    /// A new span for a saga, from the definition (see [`SagaDefinition::span`]);
    /// with `resume_from`, a child of that stored `traceparent`, so that a resumed
    /// saga joins its original trace. Fills the span's `trace_id` field.
    pub fn saga_span(&self, saga_id: Uuid, resume_from: Option<&str>) -> tracing::Span {
        let span = (self.inner.definition.span)(saga_id);
        if let Some(traceparent) = resume_from.filter(|t| !t.is_empty()) {
            svc_kit::propagation::adopt_traceparent(&span, traceparent);
            span.record("resumed", true);
        }
        span.record("trace_id", svc_kit::propagation::trace_id(&span));
        span
    }

    /// Starts driving a saga just recorded by [`log::insert_saga`], in `span`
    /// (whose `traceparent` was recorded with it).
    pub fn start(&self, saga_id: Uuid, data: Arc<D>, span: tracing::Span) {
        let cursor = Cursor {
            status: SagaStatus::Running,
            next_step: 0,
            cancel_requested: false,
            failure_reason: String::new(),
        };
        self.inner.metrics.started();
        self.spawn_driver(saga_id, data, cursor, span);
    }

    /// Resumes every open saga of this definition from the log. Returns how many.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        let open = log::load_open(&self.inner.pool, self.inner.definition.kind).await?;
        let count = open.len();
        for saga in open {
            let data: D = serde_json::from_str(&saga.data_json).map_err(|e| {
                anyhow::anyhow!("saga {} has data this build cannot read: {e}", saga.saga_id)
            })?;
            let cursor = Cursor {
                status: saga.status,
                next_step: saga.next_step,
                cancel_requested: saga.cancel_requested,
                failure_reason: saga.failure_reason,
            };
            // The resumed steps join the saga's original trace.
            let span = self.saga_span(saga.saga_id, Some(&saga.trace_context));
            self.spawn_driver(saga.saga_id, Arc::new(data), cursor, span);
        }
        Ok(count)
    }

    /// Stops starting new calls, then waits up to `grace` for drivers to reach a
    /// checkpoint. Whatever is still in flight after that is left to recovery.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stopping.send_replace(true);
        self.inner.drivers.close();
        if tokio::time::timeout(grace, self.inner.drivers.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.inner.drivers.len(),
                "sagas still in flight at shutdown; they resume from the log on restart"
            );
        }
    }

    fn spawn_driver(&self, saga_id: Uuid, data: Arc<D>, cursor: Cursor, span: tracing::Span) {
        let inner = self.inner.clone();
        self.inner.drivers.spawn(
            async move {
                let Ok(_permit) = inner.permits.acquire().await else {
                    return;
                };
                let _in_flight = inner.metrics.in_flight();
                if inner.drive(saga_id, &data, cursor).await.is_err() {
                    tracing::info!("saga interrupted by shutdown; it resumes from the log");
                }
            }
            .instrument(span),
        );
    }
}

impl<D: Send + Sync + 'static> Inner<D> {
    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    async fn drive(&self, saga_id: Uuid, data: &D, mut cursor: Cursor) -> Result<(), Interrupted> {
        let step_count = self.definition.steps.len() as i64;
        loop {
            if self.stopping() {
                return Err(Interrupted);
            }
            match cursor.status {
                SagaStatus::Running if cursor.cancel_requested => {
                    // Undo what is done: the steps before the cursor. The step at
                    // the cursor was recorded as started but never called.
                    cursor.failure_reason = "cancelled by the client".into();
                    let mut skipped = vec![];
                    if let Some(step) = self.definition.steps.get(cursor.next_step as usize) {
                        let mut record = StepRecord::started(
                            Phase::Forward,
                            cursor.next_step,
                            step.name(),
                            now_ms(),
                        );
                        record.status = StepStatus::Skipped;
                        record.finished_at_ms = record.started_at_ms;
                        skipped.push(record);
                    }
                    let from = cursor.next_step - 1;
                    self.begin_compensation(saga_id, data, &mut cursor, from, skipped)
                        .await?;
                }
                SagaStatus::Running if cursor.next_step >= step_count => {
                    self.finish(saga_id, data, &mut cursor, SagaStatus::Completed)
                        .await?;
                }
                SagaStatus::Running => self.run_forward_step(saga_id, data, &mut cursor).await?,
                SagaStatus::Compensating if cursor.next_step < 0 => {
                    let end = if cursor.cancel_requested {
                        SagaStatus::Cancelled
                    } else {
                        SagaStatus::Compensated
                    };
                    self.finish(saga_id, data, &mut cursor, end).await?;
                }
                SagaStatus::Compensating => {
                    self.run_compensation_step(saga_id, data, &mut cursor)
                        .await?
                }
                _ => return Ok(()),
            }
        }
    }

    async fn run_forward_step(
        &self,
        saga_id: Uuid,
        data: &D,
        cursor: &mut Cursor,
    ) -> Result<(), Interrupted> {
        let index = cursor.next_step;
        let step = self.definition.steps[index as usize].clone();
        let started = now_ms();
        let outcome = self.attempt_forward(saga_id, step.as_ref(), data).await?;
        crash_points::reach(point::AFTER_STEP_REPLY).await;
        let finished = Some(now_ms());
        let mut record = StepRecord::started(Phase::Forward, index, step.name(), started);
        record.finished_at_ms = finished;
        match outcome {
            ForwardOutcome::Succeeded {
                output,
                attempts,
                last_error,
            } => {
                record.status = StepStatus::Succeeded;
                record.attempts = attempts;
                record.last_error = last_error;
                record.output = output;
                let next = index + 1;
                let mut steps = vec![record];
                if let Some(next_step) = self.definition.steps.get(next as usize) {
                    steps.push(StepRecord::started(
                        Phase::Forward,
                        next,
                        next_step.name(),
                        now_ms(),
                    ));
                }
                let enter_pivot = self.definition.pivot == Some(next as usize);
                let state = SagaState {
                    status: SagaStatus::Running,
                    next_step: next,
                    failure_reason: String::new(),
                };
                let applied = self
                    .checkpoint(saga_id, steps, Some(state), enter_pivot)
                    .await?;
                cursor.next_step = next;
                cursor.cancel_requested = applied.cancel_requested;
            }
            ForwardOutcome::Failed { status, attempts } => {
                record.status = StepStatus::Failed;
                record.attempts = attempts;
                record.last_error = describe(&status);
                cursor.failure_reason = format!("{} failed: {}", step.name(), status.message());
                tracing::info!(step = step.name(), code = ?status.code(), "step failed for good; compensating");
                // A definite failure had no effect: undo only the steps before it.
                self.begin_compensation(saga_id, data, cursor, index - 1, vec![record])
                    .await?;
            }
            ForwardOutcome::Unknown {
                attempts,
                last_error,
            } => {
                record.status = StepStatus::Unknown;
                record.attempts = attempts;
                cursor.failure_reason = format!(
                    "{} outcome unknown after {attempts} attempts: {last_error}",
                    step.name()
                );
                record.last_error = last_error;
                tracing::warn!(
                    step = step.name(),
                    attempts,
                    "step outcome unknown; compensating it too"
                );
                // It may have taken effect: undo it as well.
                self.begin_compensation(saga_id, data, cursor, index, vec![record])
                    .await?;
            }
        }
        Ok(())
    }

    /// Switches to compensation from step `from` down to 0. With nothing to undo
    /// after a failure, the saga ends FAILED at once.
    async fn begin_compensation(
        &self,
        saga_id: Uuid,
        data: &D,
        cursor: &mut Cursor,
        from: i64,
        mut steps: Vec<StepRecord>,
    ) -> Result<(), Interrupted> {
        let status = if from < 0 && !cursor.cancel_requested {
            SagaStatus::Failed
        } else {
            SagaStatus::Compensating
        };
        if from >= 0 {
            let name = self.definition.steps[from as usize].name();
            steps.push(StepRecord::started(
                Phase::Compensation,
                from,
                name,
                now_ms(),
            ));
        }
        let state = SagaState {
            status,
            next_step: from,
            failure_reason: cursor.failure_reason.clone(),
        };
        let events = if status == SagaStatus::Failed {
            let milestone = Milestone::Finished {
                status,
                failure_reason: &cursor.failure_reason,
            };
            self.announce(saga_id, data, &milestone)
        } else {
            vec![]
        };
        self.checkpoint_with_events(saga_id, steps, Some(state), false, events)
            .await?;
        if status == SagaStatus::Failed {
            self.metrics.finished(status);
            tracing::info!(status = status.as_str(), "saga finished");
        }
        cursor.status = status;
        cursor.next_step = from;
        Ok(())
    }

    async fn run_compensation_step(
        &self,
        saga_id: Uuid,
        data: &D,
        cursor: &mut Cursor,
    ) -> Result<(), Interrupted> {
        let index = cursor.next_step;
        let step = self.definition.steps[index as usize].clone();
        let started = now_ms();
        let request_id = Call::request_id(saga_id, step.name(), Phase::Compensation);
        let mut attempt = 0u32;
        let mut last_error = String::new();
        let since = std::time::Instant::now();
        let mut announced_stuck = false;
        let output = loop {
            attempt += 1;
            let result = self
                .attempt(
                    saga_id,
                    step.as_ref(),
                    data,
                    Phase::Compensation,
                    attempt,
                    &request_id,
                )
                .await;
            if let Err(status) = &result {
                self.metrics
                    .retry(step.name(), Phase::Compensation, status.code());
            }
            match result {
                Ok(output) => break output,
                Err(status) => {
                    last_error = describe(&status);
                    tracing::warn!(step = step.name(), attempt, error = %last_error, "compensation failed; retrying");
                    // Recorded, so that a stuck compensation is visible with its error.
                    let mut record =
                        StepRecord::started(Phase::Compensation, index, step.name(), started);
                    record.attempts = attempt;
                    record.last_error = last_error.clone();
                    let stuck =
                        !announced_stuck && since.elapsed() >= self.policy.compensation_stuck_after;
                    let events = if stuck {
                        announced_stuck = true;
                        tracing::error!(step = step.name(), attempt, error = %last_error, "compensation stuck");
                        let milestone = Milestone::CompensationStuck {
                            step: step.name(),
                            attempts: attempt,
                            last_error: &last_error,
                        };
                        self.announce(saga_id, data, &milestone)
                    } else {
                        vec![]
                    };
                    self.checkpoint_with_events(saga_id, vec![record], None, false, events)
                        .await?;
                    let wait = self
                        .policy
                        .backoff(attempt, self.policy.max_compensation_backoff);
                    self.sleep_unless_stopping(wait).await?;
                }
            }
        };
        let mut record = StepRecord::started(Phase::Compensation, index, step.name(), started);
        record.status = StepStatus::Succeeded;
        record.attempts = attempt;
        record.last_error = last_error;
        record.output = output;
        record.finished_at_ms = Some(now_ms());
        let next = index - 1;
        let mut steps = vec![record];
        if next >= 0 {
            let name = self.definition.steps[next as usize].name();
            steps.push(StepRecord::started(
                Phase::Compensation,
                next,
                name,
                now_ms(),
            ));
        }
        let state = SagaState {
            status: SagaStatus::Compensating,
            next_step: next,
            failure_reason: cursor.failure_reason.clone(),
        };
        self.checkpoint(saga_id, steps, Some(state), false).await?;
        if next >= 0 {
            crash_points::reach(point::BETWEEN_COMPENSATIONS).await;
        }
        cursor.next_step = next;
        Ok(())
    }

    /// One attempt of a step in `phase`: the call under its deadline, in its
    /// own span, timed for the metrics; a failure is marked on the span.
    async fn attempt(
        &self,
        saga_id: Uuid,
        step: &dyn Step<D>,
        data: &D,
        phase: Phase,
        attempt: u32,
        request_id: &str,
    ) -> Result<String, Status> {
        let call = Call {
            saga_id,
            request_id: request_id.to_owned(),
            attempt,
            timeout: self.policy.call_timeout,
        };
        let span = attempt_span(step.name(), phase, &call);
        let timer = std::time::Instant::now();
        let result = match phase {
            Phase::Forward => {
                self.call_with_deadline(step.forward(data, &call))
                    .instrument(span.clone())
                    .await
            }
            Phase::Compensation => {
                self.call_with_deadline(step.compensate(data, &call))
                    .instrument(span.clone())
                    .await
            }
        };
        self.metrics
            .attempt(step.name(), phase, timer.elapsed().as_secs_f64());
        if let Err(status) = &result {
            record_failure(&span, status);
        }
        result
    }

    async fn attempt_forward(
        &self,
        saga_id: Uuid,
        step: &dyn Step<D>,
        data: &D,
    ) -> Result<ForwardOutcome, Interrupted> {
        let request_id = Call::request_id(saga_id, step.name(), Phase::Forward);
        let mut last_error = String::new();
        for attempt in 1..=self.policy.max_attempts {
            let result = self
                .attempt(saga_id, step, data, Phase::Forward, attempt, &request_id)
                .await;
            if let Err(status) = &result
                && is_transient(status.code())
                && attempt < self.policy.max_attempts
            {
                self.metrics
                    .retry(step.name(), Phase::Forward, status.code());
            }
            match result {
                Ok(output) => {
                    return Ok(ForwardOutcome::Succeeded {
                        output,
                        attempts: attempt,
                        last_error,
                    });
                }
                Err(status) if !is_transient(status.code()) => {
                    return Ok(ForwardOutcome::Failed {
                        status,
                        attempts: attempt,
                    });
                }
                Err(status) => {
                    last_error = describe(&status);
                    tracing::debug!(step = step.name(), attempt, error = %last_error, "transient failure; retrying");
                }
            }
            if attempt < self.policy.max_attempts {
                let wait = self.policy.backoff(attempt, self.policy.max_backoff);
                self.sleep_unless_stopping(wait).await?;
            }
        }
        Ok(ForwardOutcome::Unknown {
            attempts: self.policy.max_attempts,
            last_error,
        })
    }

    /// Bounds a call by its deadline even if the callee never answers.
    async fn call_with_deadline(
        &self,
        call: impl Future<Output = Result<String, Status>>,
    ) -> Result<String, Status> {
        // A little slack so the callee's own DEADLINE_EXCEEDED usually wins.
        let limit = self.policy.call_timeout + Duration::from_millis(250);
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no reply within {limit:?}"
            ))),
        }
    }

    async fn finish(
        &self,
        saga_id: Uuid,
        data: &D,
        cursor: &mut Cursor,
        status: SagaStatus,
    ) -> Result<(), Interrupted> {
        let state = SagaState {
            status,
            next_step: cursor.next_step,
            failure_reason: cursor.failure_reason.clone(),
        };
        let milestone = Milestone::Finished {
            status,
            failure_reason: &cursor.failure_reason,
        };
        let events = self.announce(saga_id, data, &milestone);
        self.checkpoint_with_events(saga_id, vec![], Some(state), false, events)
            .await?;
        self.metrics.finished(status);
        tracing::info!(status = status.as_str(), "saga finished");
        cursor.status = status;
        Ok(())
    }

    /// Commits a checkpoint, retrying until the store takes it: the saga never
    /// moves on without its record.
    async fn checkpoint(
        &self,
        saga_id: Uuid,
        steps: Vec<StepRecord>,
        state: Option<SagaState>,
        enter_pivot: bool,
    ) -> Result<Applied, Interrupted> {
        self.checkpoint_with_events(saga_id, steps, state, enter_pivot, vec![])
            .await
    }

    /// The event a milestone of this saga announces, ready for the outbox.
    fn announce(&self, saga_id: Uuid, data: &D, milestone: &Milestone<'_>) -> Vec<NewEvent> {
        (self.definition.announce)(data, milestone)
            .map(|a| NewEvent {
                aggregate_id: saga_id,
                event_type: a.event_type,
                data: a.data,
                traceparent: svc_kit::propagation::traceparent(&tracing::Span::current()),
            })
            .into_iter()
            .collect()
    }

    async fn checkpoint_with_events(
        &self,
        saga_id: Uuid,
        steps: Vec<StepRecord>,
        state: Option<SagaState>,
        enter_pivot: bool,
        events: Vec<NewEvent>,
    ) -> Result<Applied, Interrupted> {
        let change = SagaChange {
            saga_id,
            status: state.as_ref().map(|s| s.status),
        };
        let checkpoint = Checkpoint {
            saga_id,
            steps,
            state,
            enter_pivot,
            events,
        };
        let mut failures = 0;
        loop {
            match self.log.commit(checkpoint.clone()).await {
                Ok(applied) => {
                    let _ = self.changes.send(change);
                    return Ok(applied);
                }
                Err(err) => {
                    failures += 1;
                    tracing::error!(error = %err, failures, "cannot write the saga log; retrying");
                    self.sleep_unless_stopping(log::commit_backoff(
                        failures,
                        Duration::from_secs(5),
                    ))
                    .await?;
                }
            }
        }
    }

    async fn sleep_unless_stopping(&self, wait: Duration) -> Result<(), Interrupted> {
        let mut stopping = self.stopping.subscribe();
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            _ = stopping.wait_for(|s| *s) => Err(Interrupted),
        }
    }
}

/// One span per attempt, child of the saga's span; the callee's server span
/// becomes its child through the propagated trace context.
fn attempt_span(step: &'static str, phase: Phase, call: &Call) -> tracing::Span {
    tracing::info_span!(
        "step_attempt",
        otel.name = format!("{step} {phase}"),
        saga_id = %call.saga_id,
        step,
        phase = phase.as_str(),
        attempt = call.attempt,
        request_id = %call.request_id,
        otel.status_code = tracing::field::Empty,
        error.code = tracing::field::Empty,
        error.message = tracing::field::Empty,
    )
}

/// Marks an attempt span as failed, with the callee's status.
fn record_failure(span: &tracing::Span, status: &Status) {
    span.record("otel.status_code", "ERROR");
    span.record("error.code", format!("{:?}", status.code()));
    span.record("error.message", status.message());
}

/// The status and, for transport failures, the chain of causes (a bare
/// "tcp connect error" says too little to act on).
fn describe(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
