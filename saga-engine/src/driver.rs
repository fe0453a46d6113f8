//! Drives one saga: runs the step at its cursor, records the result and the
//! cursor moved past it in one checkpoint, waits for that commit, moves on.
//!
//! - A definite "no" (see [`crate::retry`]) compensates the steps before it.
//! - A step whose outcome stays unknown after its retry budget is compensated
//!   itself: its compensation is a no-op if it never took effect.
//! - Compensations retry until they succeed; each failed attempt is recorded,
//!   so a stuck saga stays visible as COMPENSATING with its last error.
//! - An accepted cancel always ends the saga CANCELLED. The store tells the
//!   driver about it in the same statement that moves the saga on, so no
//!   change of state can slip between the cancel and the driver's decision.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use tonic::Status;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    changes::SagaChange,
    crash_points::{self, point},
    cursor::Cursor,
    definition::{Call, Milestone, Phase, Step},
    engine::Inner,
    events::NewEvent,
    log::{
        self, Applied, AttemptRecord, Checkpoint, MAX_RECORDED_ATTEMPTS, SagaState, SagaStatus,
        SagaView, StepRecord, StepStatus,
    },
    now_ms,
    retry::{Answer, classify},
    trace_context,
};

/// The reason a cancelled saga ends with.
const CANCELLED_REASON: &str = "cancelled by the client";

/// What the driver knows of its saga, as last committed.
pub(crate) struct Driving {
    pub cursor: Cursor,
    pub cancel_requested: bool,
    pub failure_reason: String,
    /// A compensation was begun: after a failure, the saga then ends
    /// COMPENSATED rather than FAILED.
    pub undid_any: bool,
    /// The epoch this driver holds the saga at: every checkpoint is written
    /// only while the saga is still at it.
    pub epoch: i64,
}

impl Driving {
    pub fn new(cursor: Cursor, epoch: i64) -> Self {
        Driving {
            cursor,
            cancel_requested: false,
            failure_reason: String::new(),
            undid_any: false,
            epoch,
        }
    }
}

/// Why a driver stopped before its saga's end.
pub(crate) enum Stopped {
    /// The process is shutting down; recovery resumes the saga.
    Interrupted,
    /// Another replica claimed the saga (this one was paused, cut off or
    /// slow past its lease); it drives it from here.
    Fenced,
}

/// Why a driver stops before the saga's end.
enum Halt {
    /// The process is shutting down; recovery resumes the saga.
    Interrupted,
    /// The log says the saga is already terminal, with this status: a
    /// checkpoint whose first COMMIT succeeded was sent again after its reply
    /// was lost. Its outcome stands.
    Closed(SagaStatus),
    /// The saga moved to a later epoch: another replica drives it now.
    Fenced,
}

enum ForwardOutcome {
    Succeeded {
        output: String,
        attempts: u32,
        last_error: String,
    },
    /// A definite "no": the action did not happen.
    Refused { status: Status, attempts: u32 },
    /// No definite answer: the action may have happened.
    Unknown { attempts: u32, last_error: String },
}

pub(crate) struct Driver<'a, D> {
    inner: &'a Inner<D>,
    saga_id: Uuid,
    data: &'a D,
    /// Signalled when a cancel of this saga is accepted.
    cancelled: &'a Notify,
    state: Driving,
    /// The attempts of the step under way, until its next checkpoint
    /// takes them (see [`AttemptRecord`]).
    tries: std::sync::Mutex<Vec<AttemptRecord>>,
    /// The saga as the log holds it, kept by applying each checkpoint as
    /// the log does, when this driver recorded it; told with its end, so
    /// that its waiters need not read it.
    view: std::sync::Mutex<Option<SagaView>>,
}

impl<'a, D: Send + Sync + 'static> Driver<'a, D> {
    pub fn new(
        inner: &'a Inner<D>,
        saga_id: Uuid,
        data: &'a D,
        cancelled: &'a Notify,
        state: Driving,
        recorded: Option<SagaView>,
    ) -> Self {
        Driver {
            inner,
            saga_id,
            data,
            cancelled,
            state,
            tries: std::sync::Mutex::new(Vec::new()),
            view: std::sync::Mutex::new(recorded),
        }
    }

    /// The attempts made since the last call, for the next step record;
    /// none unless `keep` says so. Not kept, they are cleared in place: the
    /// buffer's room is reused, so a saga whose steps settle at once
    /// allocates it once.
    fn take_tries(&self, keep: impl FnOnce(&[AttemptRecord]) -> bool) -> Vec<AttemptRecord> {
        let mut tries = self.tries.lock().unwrap_or_else(|e| e.into_inner());
        if keep(&tries) {
            std::mem::take(&mut *tries)
        } else {
            tries.clear();
            Vec::new()
        }
    }

    pub async fn run(mut self) -> Result<(), Stopped> {
        match self.drive().await {
            Ok(()) => Ok(()),
            Err(Halt::Closed(status)) => {
                self.finished(status);
                Ok(())
            }
            Err(Halt::Interrupted) => Err(Stopped::Interrupted),
            Err(Halt::Fenced) => Err(Stopped::Fenced),
        }
    }

    async fn drive(&mut self) -> Result<(), Halt> {
        let step_count = self.inner.definition.steps.len();
        loop {
            if self.inner.stopping() {
                return Err(Halt::Interrupted);
            }
            match self.state.cursor {
                Cursor::Forward { step, maybe_sent } if self.state.cancel_requested => {
                    self.cancel_at(step, maybe_sent).await?
                }
                Cursor::Forward { step, .. } if step >= step_count => self.complete().await?,
                Cursor::Forward { step, .. } => self.run_forward_step(step).await?,
                Cursor::Compensating { step: Some(step) } => {
                    self.run_compensation_step(step).await?
                }
                Cursor::Compensating { step: None } => {
                    let end = self.end_after_compensation();
                    self.finish(end).await?
                }
                Cursor::Finished(_) => return Ok(()),
            }
        }
    }

    /// A cancel was accepted while the saga runs, with `step` at the cursor:
    /// undo the done steps, and the step at the cursor too if its call may
    /// have been sent (this driver resumed it from the log).
    async fn cancel_at(&mut self, step: usize, maybe_sent: bool) -> Result<(), Halt> {
        self.state.failure_reason = CANCELLED_REASON.into();
        let mut records = vec![];
        let from = if maybe_sent {
            if let Some(s) = self.inner.definition.steps.get(step) {
                let mut record =
                    StepRecord::started(Phase::Forward, step as i64, s.name(), now_ms());
                record.status = StepStatus::Unknown;
                record.last_error =
                    "cancelled while the step may have been in flight; compensated".into();
                record.finished_at_ms = Some(now_ms());
                records.push(record);
                Some(step)
            } else {
                step.checked_sub(1)
            }
        } else {
            if let Some(s) = self.inner.definition.steps.get(step) {
                let mut record =
                    StepRecord::started(Phase::Forward, step as i64, s.name(), now_ms());
                record.status = StepStatus::Skipped;
                record.finished_at_ms = record.started_at_ms;
                records.push(record);
            }
            step.checked_sub(1)
        };
        self.begin_compensation(from, records).await
    }

    async fn run_forward_step(&mut self, index: usize) -> Result<(), Halt> {
        let step = self.inner.definition.steps[index].clone();
        let started = now_ms();
        let outcome = self.attempt_forward(step.as_ref()).await?;
        crash_points::reach(point::AFTER_STEP_REPLY).await;
        let mut record = StepRecord::started(Phase::Forward, index as i64, step.name(), started);
        record.finished_at_ms = Some(now_ms());
        // Each attempt is kept only when there was more than one.
        record.attempt_log = self.take_tries(|tries| tries.len() > 1);
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
                self.step_succeeded(index, record).await?;
            }
            ForwardOutcome::Refused { status, attempts } => {
                record.status = StepStatus::Failed;
                record.attempts = attempts;
                record.last_error = describe(&status);
                self.state.failure_reason = format!("{} failed: {}", step.name(), status.message());
                tracing::info!(step = step.name(), code = ?status.code(), "step refused; compensating");
                // A definite "no" had no effect: undo only the steps before it.
                self.begin_compensation(index.checked_sub(1), vec![record])
                    .await?;
            }
            ForwardOutcome::Unknown {
                attempts,
                last_error,
            } => {
                record.status = StepStatus::Unknown;
                record.attempts = attempts;
                self.state.failure_reason = format!(
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
                self.begin_compensation(Some(index), vec![record]).await?;
            }
        }
        Ok(())
    }

    /// Records a step's success and moves the saga to the next step (whose
    /// start is no record: see `SagaView::running_step`); after the last
    /// step, the same checkpoint completes the saga, unless a cancel came
    /// first.
    async fn step_succeeded(&mut self, index: usize, record: StepRecord) -> Result<(), Halt> {
        let next = index + 1;
        let steps = vec![record];
        let last = next == self.inner.definition.steps.len();
        let state = SagaState {
            status: SagaStatus::Running,
            next_step: next as i64,
            failure_reason: String::new(),
        };
        let checkpoint = Checkpoint {
            saga_id: self.saga_id,
            epoch: self.state.epoch,
            steps,
            state: Some(state),
            enter_pivot: self.inner.definition.pivot_index() == Some(next),
            complete: last,
            events: if last {
                self.announce_finished(SagaStatus::Completed, "")
            } else {
                vec![]
            },
        };
        let applied = self.checkpoint(checkpoint).await?;
        self.state.cancel_requested |= applied.cancel_requested;
        if applied.completed {
            self.finished(SagaStatus::Completed);
        } else {
            self.state.cursor = Cursor::Forward {
                step: next,
                maybe_sent: false,
            };
        }
        Ok(())
    }

    /// Every step is done but the saga is not yet COMPLETED: it was resumed
    /// between the two (a log written before completion shared the last step's
    /// checkpoint), or a cancel was accepted before the completion.
    async fn complete(&mut self) -> Result<(), Halt> {
        let checkpoint = Checkpoint {
            saga_id: self.saga_id,
            epoch: self.state.epoch,
            steps: vec![],
            state: None,
            enter_pivot: false,
            complete: true,
            events: self.announce_finished(SagaStatus::Completed, ""),
        };
        let applied = self.checkpoint(checkpoint).await?;
        self.state.cancel_requested |= applied.cancel_requested;
        if applied.completed {
            self.finished(SagaStatus::Completed);
        }
        Ok(())
    }

    /// Switches to compensation from step `from` down to the first, reading
    /// in the same statement whether a cancel was accepted meanwhile (after
    /// this, none can be: the saga is no longer RUNNING).
    async fn begin_compensation(
        &mut self,
        from: Option<usize>,
        steps: Vec<StepRecord>,
    ) -> Result<(), Halt> {
        let applied = self.compensate_next(from, steps).await?;
        self.state.cancel_requested |= applied.cancel_requested;
        self.state.undid_any |= from.is_some();
        Ok(())
    }

    /// Commits `steps` with the saga COMPENSATING at `next` (recorded as
    /// started), or with nothing left to undo, and moves the cursor there.
    async fn compensate_next(
        &mut self,
        next: Option<usize>,
        mut steps: Vec<StepRecord>,
    ) -> Result<Applied, Halt> {
        if let Some(next) = next {
            let name = self.inner.definition.steps[next].name();
            steps.push(StepRecord::started(
                Phase::Compensation,
                next as i64,
                name,
                now_ms(),
            ));
        }
        let cursor = Cursor::Compensating { step: next };
        let state = SagaState {
            status: SagaStatus::Compensating,
            next_step: cursor.next_step_column().unwrap_or(-1),
            failure_reason: self.state.failure_reason.clone(),
        };
        let applied = self
            .checkpoint(Checkpoint::new(
                self.saga_id,
                self.state.epoch,
                steps,
                Some(state),
                vec![],
            ))
            .await?;
        self.state.cursor = cursor;
        Ok(applied)
    }

    async fn run_compensation_step(&mut self, index: usize) -> Result<(), Halt> {
        self.state.undid_any = true;
        let step = self.inner.definition.steps[index].clone();
        let started = now_ms();
        let request_id = Call::request_id(self.saga_id, step.name(), Phase::Compensation);
        let mut attempt = 0u32;
        let mut last_error = String::new();
        let since = Instant::now();
        let mut announced_stuck = false;
        let output = loop {
            attempt += 1;
            let result = self
                .attempt(step.as_ref(), Phase::Compensation, attempt, &request_id)
                .await;
            let status = match result {
                Ok(output) => break output,
                Err(status) => status,
            };
            self.inner
                .metrics
                .retry(step.name(), Phase::Compensation, status.code());
            last_error = describe(&status);
            tracing::warn!(step = step.name(), attempt, error = %last_error, "compensation failed; retrying");
            // Recorded, so that a stuck compensation is visible with its error.
            let mut record =
                StepRecord::started(Phase::Compensation, index as i64, step.name(), started);
            record.attempts = attempt;
            record.last_error = last_error.clone();
            record.attempt_log = self.take_tries(|_| true);
            let stuck =
                !announced_stuck && since.elapsed() >= self.inner.policy.compensation_stuck_after;
            let events = if stuck {
                announced_stuck = true;
                tracing::error!(step = step.name(), attempt, error = %last_error, "compensation stuck");
                let milestone = Milestone::CompensationStuck {
                    step: step.name(),
                    attempts: attempt,
                    last_error: &last_error,
                };
                self.announce(&milestone)
            } else {
                vec![]
            };
            self.checkpoint(Checkpoint::new(
                self.saga_id,
                self.state.epoch,
                vec![record],
                None,
                events,
            ))
            .await?;
            if let Some(budget) = self.inner.policy.compensation_attention_after
                && since.elapsed() >= budget
            {
                tracing::error!(step = step.name(), attempt, error = %last_error, "compensation gave up; the saga needs attention");
                let mut record =
                    StepRecord::started(Phase::Compensation, index as i64, step.name(), started);
                record.status = StepStatus::Failed;
                record.attempts = attempt;
                record.finished_at_ms = Some(now_ms());
                let gave_up = format!(
                    "undoing {} failed for {} s ({attempt} attempts): {last_error}",
                    step.name(),
                    since.elapsed().as_secs()
                );
                self.state.failure_reason = if self.state.failure_reason.is_empty() {
                    gave_up
                } else {
                    format!("{}; then {gave_up}", self.state.failure_reason)
                };
                record.last_error = last_error;
                return self
                    .finish_with(SagaStatus::NeedsAttention, vec![record])
                    .await;
            }
            let wait = self
                .inner
                .policy
                .backoff(attempt, self.inner.policy.max_compensation_backoff);
            self.sleep_unless_stopping(wait).await?;
        };
        let mut record =
            StepRecord::started(Phase::Compensation, index as i64, step.name(), started);
        record.status = StepStatus::Succeeded;
        record.attempts = attempt;
        record.last_error = last_error;
        record.output = output;
        record.finished_at_ms = Some(now_ms());
        // The failed ones went with their own checkpoints.
        record.attempt_log = self.take_tries(|_| attempt > 1);
        match index.checked_sub(1) {
            Some(next) => {
                self.compensate_next(Some(next), vec![record]).await?;
                crash_points::reach(point::BETWEEN_COMPENSATIONS).await;
            }
            None => {
                // The last undo commits with the saga's end: the move to
                // "nothing left to undo" would be one more commit on the
                // path of every compensated saga. No cancel can be accepted
                // any more (the saga is not RUNNING), so the end is known.
                self.state.cursor = Cursor::Compensating { step: None };
                let end = self.end_after_compensation();
                self.finish_with(end, vec![record]).await?;
            }
        }
        Ok(())
    }

    /// How a saga ends once nothing is left to undo.
    fn end_after_compensation(&self) -> SagaStatus {
        if self.state.cancel_requested {
            SagaStatus::Cancelled
        } else if self.state.undid_any {
            SagaStatus::Compensated
        } else {
            SagaStatus::Failed
        }
    }

    /// Forward attempts until a success, a definite "no", or the end of the
    /// budget. A cancel accepted meanwhile ends the retries at once: the
    /// outcome stays unknown, and the step is compensated.
    async fn attempt_forward(&self, step: &dyn Step<D>) -> Result<ForwardOutcome, Halt> {
        let request_id = Call::request_id(self.saga_id, step.name(), Phase::Forward);
        let policy = &self.inner.policy;
        let mut last_error = String::new();
        for attempt in 1..=policy.max_attempts {
            let status = match self
                .attempt(step, Phase::Forward, attempt, &request_id)
                .await
            {
                Ok(output) => {
                    return Ok(ForwardOutcome::Succeeded {
                        output,
                        attempts: attempt,
                        last_error,
                    });
                }
                Err(status) if classify(status.code()) == Answer::Definite => {
                    return Ok(ForwardOutcome::Refused {
                        status,
                        attempts: attempt,
                    });
                }
                Err(status) => status,
            };
            last_error = describe(&status);
            if attempt == policy.max_attempts {
                break;
            }
            self.inner
                .metrics
                .retry(step.name(), Phase::Forward, status.code());
            tracing::debug!(step = step.name(), attempt, error = %last_error, "outcome unknown; retrying");
            let wait = policy.backoff(attempt, policy.max_backoff);
            let stopping = self.inner.stopping.subscribe();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.cancelled.notified() => {
                    return Ok(ForwardOutcome::Unknown {
                        attempts: attempt,
                        last_error: format!("cancelled while retrying: {last_error}"),
                    });
                }
                _ = wait_stopping(stopping) => return Err(Halt::Interrupted),
            }
        }
        Ok(ForwardOutcome::Unknown {
            attempts: policy.max_attempts,
            last_error,
        })
    }

    /// One attempt of a step in `phase`: the call under its deadline, in its
    /// own span, timed for the metrics; a failure is marked on the span.
    async fn attempt(
        &self,
        step: &dyn Step<D>,
        phase: Phase,
        attempt: u32,
        request_id: &str,
    ) -> Result<String, Status> {
        let call = Call {
            saga_id: self.saga_id,
            request_id: request_id.to_owned(),
            attempt,
            timeout: self.inner.policy.call_timeout,
        };
        let span = attempt_span(step.name(), phase, &call);
        let timer = Instant::now();
        let started_at_ms = now_ms();
        let result = match phase {
            Phase::Forward => {
                self.call_with_deadline(step.forward(self.data, &call))
                    .instrument(span.clone())
                    .await
            }
            Phase::Compensation => {
                self.call_with_deadline(step.compensate(self.data, &call))
                    .instrument(span.clone())
                    .await
            }
        };
        self.inner
            .metrics
            .attempt(step.name(), phase, timer.elapsed().as_secs_f64());
        if let Err(status) = &result {
            record_failure(&span, status);
        }
        if attempt <= MAX_RECORDED_ATTEMPTS {
            self.tries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(AttemptRecord {
                    attempt,
                    started_at_ms,
                    finished_at_ms: now_ms(),
                    error: result.as_ref().err().map(describe).unwrap_or_default(),
                });
        }
        result
    }

    /// Bounds a call by its deadline even if the callee never answers.
    async fn call_with_deadline(
        &self,
        call: impl Future<Output = Result<String, Status>>,
    ) -> Result<String, Status> {
        // A little slack so the callee's own DEADLINE_EXCEEDED usually wins.
        let limit = self.inner.policy.call_timeout + Duration::from_millis(250);
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no reply within {limit:?}"
            ))),
        }
    }

    async fn finish(&mut self, status: SagaStatus) -> Result<(), Halt> {
        self.finish_with(status, vec![]).await
    }

    /// Ends the saga at `status`, committing `steps` with it.
    async fn finish_with(
        &mut self,
        status: SagaStatus,
        steps: Vec<StepRecord>,
    ) -> Result<(), Halt> {
        if status == SagaStatus::Cancelled {
            self.state.failure_reason = CANCELLED_REASON.into();
        }
        let state = SagaState {
            status,
            next_step: self.state.cursor.next_step_column().unwrap_or(-1),
            failure_reason: self.state.failure_reason.clone(),
        };
        let events = self.announce_finished(status, &self.state.failure_reason.clone());
        self.checkpoint(Checkpoint::new(
            self.saga_id,
            self.state.epoch,
            steps,
            Some(state),
            events,
        ))
        .await?;
        self.finished(status);
        Ok(())
    }

    fn finished(&mut self, status: SagaStatus) {
        self.inner.metrics.finished(status);
        tracing::info!(status = status.as_str(), "saga finished");
        self.state.cursor = Cursor::Finished(status);
    }

    fn announce_finished(&self, status: SagaStatus, failure_reason: &str) -> Vec<NewEvent> {
        self.announce(&Milestone::Finished {
            status,
            failure_reason,
        })
    }

    fn announce(&self, milestone: &Milestone<'_>) -> Vec<NewEvent> {
        let traceparent = trace_context::traceparent(&tracing::Span::current());
        self.inner.announce(
            self.saga_id,
            self.state.epoch,
            self.data,
            milestone,
            &traceparent,
        )
    }

    /// Commits a checkpoint, retrying until the store takes it: the saga never
    /// moves on without its record. A retry may apply a checkpoint whose first
    /// COMMIT succeeded but whose reply was lost; applying one twice is harmless.
    ///
    /// Boxed: a checkpoint and its commit are large and live a few
    /// milliseconds, while a saga spends its life waiting for a step's
    /// reply. Inline, every driver's task would be sized for the commit.
    fn checkpoint(
        &self,
        checkpoint: Checkpoint,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Applied, Halt>> + Send + '_>> {
        Box::pin(self.commit_until_taken(checkpoint))
    }

    async fn commit_until_taken(&self, checkpoint: Checkpoint) -> Result<Applied, Halt> {
        let mut failures = 0;
        loop {
            match self.inner.log.commit(checkpoint.clone()).await {
                Ok(Applied { fenced: true, .. }) => {
                    tracing::warn!(
                        epoch = self.state.epoch,
                        "another replica took this saga over; this one stops driving it"
                    );
                    return Err(Halt::Fenced);
                }
                Ok(Applied {
                    closed: Some(status),
                    ..
                }) => {
                    // Ended by an earlier commit whose reply was lost (or by
                    // another driver): its waiters must hear of it all the same.
                    self.inner.changes.publish(SagaChange {
                        saga_id: self.saga_id,
                        status: Some(status),
                        view: None,
                    });
                    return Err(Halt::Closed(status));
                }
                Ok(applied) => {
                    self.inner.metrics.checkpoint();
                    let status = checkpoint.status_after(&applied);
                    self.inner.changes.publish(SagaChange {
                        saga_id: self.saga_id,
                        status,
                        view: self.keep_view(&checkpoint, &applied, status),
                    });
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

    /// Applies a committed checkpoint to the kept view, if this driver
    /// keeps one; returns it when the checkpoint ended the saga.
    fn keep_view(
        &self,
        checkpoint: &Checkpoint,
        applied: &Applied,
        status: Option<SagaStatus>,
    ) -> Option<Arc<SagaView>> {
        let mut view = self.view.lock().unwrap();
        if view.is_some() && !self.inner.changes.is_watched(self.saga_id) {
            // Nobody waits any more (a `CreateOrder` that did not wait has
            // answered): a later watcher reads the log.
            *view = None;
        }
        view.as_mut()?.apply(checkpoint, applied);
        // The saga's end: its driver stops here, and no longer needs it.
        match status.is_some_and(SagaStatus::is_terminal) {
            true => view.take().map(Arc::new),
            false => None,
        }
    }

    async fn sleep_unless_stopping(&self, wait: Duration) -> Result<(), Halt> {
        let stopping = self.inner.stopping.subscribe();
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            _ = wait_stopping(stopping) => Err(Halt::Interrupted),
        }
    }
}

async fn wait_stopping(mut stopping: tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
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
