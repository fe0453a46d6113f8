//! The engine's handle: start a saga, make sure one is driven, resume every
//! open saga after a crash, cancel, watch, and shut down.
//!
//! Each saga is driven by at most one task in this process (see [`Claim`]);
//! a [`driver`](crate::driver) runs its steps. Starting is one call that
//! records the saga, the caller's own rows and the saga's first event in one
//! transaction, and then drives it, on a task of its own: a caller that goes
//! away after the commit (its client reset the stream, its deadline passed)
//! can't leave a saga that nothing drives.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use sqlx::AnyPool;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    changes::{Changes, SagaChange, SagaWatch},
    crash_points::{self, point},
    cursor::Cursor,
    definition::{Milestone, SagaDefinition},
    driver::{Driver, Driving},
    events::NewEvent,
    log::{
        self, Admit, CancelOutcome, LogWriter, NewSaga, OpenSaga, SagaStatus, SagaView, SqliteLog,
        SqliteReader, Start,
    },
    metrics::EngineMetrics,
    retry::RetryPolicy,
    trace_context,
};

/// What the caller's part of a start transaction decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Commit the saga with the caller's rows.
    Admit,
    /// Roll everything back (e.g. another request got there first).
    Refuse,
}

/// The result of [`Engine::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// Recorded and being driven.
    Started,
    /// The caller's part refused; nothing was recorded.
    Refused,
}

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

pub(crate) struct Inner<D> {
    pub(crate) definition: SagaDefinition<D>,
    pub(crate) pool: AnyPool,
    pub(crate) log: LogWriter,
    /// On a SQLite file: reads on a thread with their own connection.
    reader: Option<SqliteReader>,
    pub(crate) policy: RetryPolicy,
    /// Bounds the sagas driven at once; the rest wait for a permit.
    permits: Semaphore,
    pub(crate) changes: Changes,
    pub(crate) stopping: watch::Sender<bool>,
    drivers: TaskTracker,
    pub(crate) metrics: EngineMetrics,
    /// The sagas this process drives, each with the signal that tells its
    /// driver a cancel was accepted.
    driving: Arc<Mutex<HashMap<Uuid, Arc<Notify>>>>,
}

/// The right to drive one saga in this process; released when dropped.
pub(crate) struct Claim {
    saga_id: Uuid,
    pub(crate) cancelled: Arc<Notify>,
    driving: Arc<Mutex<HashMap<Uuid, Arc<Notify>>>>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.driving.lock().unwrap().remove(&self.saga_id);
    }
}

impl<D> Engine<D>
where
    D: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// An engine for `definition` on `pool`, whose tables must exist. Fails if
    /// the definition is malformed.
    pub fn new(
        definition: SagaDefinition<D>,
        pool: AnyPool,
        policy: RetryPolicy,
        max_in_flight: usize,
        metrics: EngineMetrics,
    ) -> anyhow::Result<Self> {
        definition.validate().map_err(anyhow::Error::msg)?;
        Ok(Engine {
            inner: Arc::new(Inner {
                log: LogWriter::spawn(pool.clone())?,
                reader: SqliteLog::file_of(&pool)
                    .map(|file| SqliteReader::open(&file))
                    .transpose()?,
                definition,
                pool,
                policy,
                permits: Semaphore::new(max_in_flight),
                changes: Changes::new(),
                stopping: watch::channel(false).0,
                drivers: TaskTracker::new(),
                metrics,
                driving: Arc::default(),
            }),
        })
    }

    pub fn definition(&self) -> &SagaDefinition<D> {
        &self.inner.definition
    }

    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// On a SQLite file, the reader for the caller's own reads of this store
    /// (one hand-over per read, not one per statement); `None` otherwise.
    pub fn sqlite_reader(&self) -> Option<&SqliteReader> {
        self.inner.reader.as_ref()
    }

    /// A saga with its step history, as shown to users.
    pub async fn view(&self, saga_id: Uuid) -> Result<Option<SagaView>, sqlx::Error> {
        match &self.inner.reader {
            Some(reader) => reader
                .run(move |conn| log::load_sqlite_view(conn, saga_id))
                .await
                .map_err(sqlx::Error::Protocol),
            None => {
                let mut conn = self.inner.pool.acquire().await?;
                log::load_view(&mut conn, saga_id).await
            }
        }
    }

    /// The writer every write to the log's tables goes through (the outbox
    /// relay marks what it published with it).
    pub fn log_writer(&self) -> LogWriter {
        self.inner.log.clone()
    }

    /// Wakes on every committed change of one saga: make it before reading
    /// the saga, then re-read after each wake.
    pub fn watch(&self, saga_id: Uuid) -> SagaWatch {
        self.inner.changes.watch(saga_id)
    }

    /// Records a new saga and drives it. In the same transaction, `admit`
    /// writes the caller's own rows (e.g. the order and its idempotency key)
    /// and may refuse, and the [`Milestone::Started`] event is written.
    ///
    /// The work runs on a task of its own, so the saga is driven even if the
    /// caller is dropped after the commit. The saga's span is a child of the
    /// caller's span; its `traceparent` is stored so a resumed saga joins it.
    pub async fn start(
        &self,
        saga_id: Uuid,
        data: D,
        admit: impl Admit,
    ) -> Result<Started, sqlx::Error> {
        let admit: Box<dyn Admit> = Box::new(admit);
        let engine = self.clone();
        let parent = tracing::Span::current();
        tokio::spawn(async move { engine.record_and_drive(saga_id, data, admit, parent).await })
            .await
            .map_err(|e| sqlx::Error::Protocol(format!("starting saga {saga_id} failed: {e}")))?
    }

    async fn record_and_drive(
        &self,
        saga_id: Uuid,
        data: D,
        admit: Box<dyn Admit>,
        parent: tracing::Span,
    ) -> Result<Started, sqlx::Error> {
        let inner = &self.inner;
        // Claimed before anything is written, so that no `ensure_driven` can
        // start a second driver between the commit and this one, and a cancel
        // accepted right after the commit finds the driver's signal.
        let claim = self.claim(saga_id).ok_or_else(|| {
            sqlx::Error::Protocol(format!("saga {saga_id} is already being driven"))
        })?;
        let span = parent.in_scope(|| self.saga_span(saga_id, None));
        let traceparent = trace_context::traceparent(&span);
        let data_json =
            serde_json::to_string(&data).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let events = inner.announce(saga_id, &data, &Milestone::Started, &traceparent);
        let start = Start {
            saga: NewSaga {
                saga_id,
                kind: inner.definition.kind,
                data_json,
                trace_context: traceparent,
                first_step: inner.definition.steps[0].name(),
                starts_at_pivot: inner.definition.pivot_index() == Some(0),
            },
            admit,
            events,
        };
        match inner.log.start(start).await {
            Ok(Admission::Admit) => {}
            Ok(Admission::Refuse) => return Ok(Started::Refused),
            Err(err) => {
                // The reply to COMMIT may be lost after the commit is durable:
                // then the saga exists and must be driven like any other.
                let stored = log::load_one_open(&inner.pool, inner.definition.kind, saga_id).await;
                if !matches!(stored, Ok(Some(_))) {
                    return Err(sqlx::Error::Protocol(err));
                }
                tracing::warn!(%saga_id, error = %err, "the commit of a new saga reported an error, but it is stored; driving it");
            }
        }
        crash_points::reach(point::AFTER_START_COMMIT).await;
        span.in_scope(|| tracing::info!("saga recorded; driving it"));
        inner.metrics.started();
        inner.changes.publish(SagaChange {
            saga_id,
            status: Some(SagaStatus::Running),
        });
        let state = Driving::new(Cursor::Forward {
            step: 0,
            maybe_sent: false,
        });
        self.spawn_driver(claim, Arc::new(data), state, span);
        Ok(Started::Started)
    }

    /// Makes sure an open saga is driven by this process: if nobody drives it
    /// (its start was lost), it is resumed from the log. Returns whether it
    /// had to be resumed.
    pub async fn ensure_driven(&self, saga_id: Uuid) -> Result<bool, sqlx::Error> {
        let Some(claim) = self.claim(saga_id) else {
            return Ok(false);
        };
        let open =
            log::load_one_open(&self.inner.pool, self.inner.definition.kind, saga_id).await?;
        let Some(open) = open else {
            return Ok(false);
        };
        tracing::warn!(%saga_id, "an open saga was not being driven; resuming it");
        self.resume(claim, open)
            .map_err(|e| sqlx::Error::Decode(e.into()))?;
        Ok(true)
    }

    /// Resumes every open saga of this definition from the log. Returns how many.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        let open = log::load_open(&self.inner.pool, self.inner.definition.kind).await?;
        let mut resumed = 0;
        for saga in open {
            let saga_id = saga.saga_id;
            let Some(claim) = self.claim(saga_id) else {
                continue;
            };
            // One saga this build can't read must not keep every other one
            // from resuming; it stays open, visible, and is logged.
            match self.resume(claim, saga) {
                Ok(()) => resumed += 1,
                Err(err) => {
                    tracing::error!(%saga_id, error = %err, "cannot resume a saga; it stays open")
                }
            }
        }
        Ok(resumed)
    }

    /// Asks to cancel a saga. An accepted cancel is durable before this
    /// returns, and the saga then ends CANCELLED, whatever else happens; its
    /// driver stops retrying a step whose outcome is still unknown.
    pub async fn cancel(&self, saga_id: Uuid) -> Result<CancelOutcome, sqlx::Error> {
        let outcome = self
            .inner
            .log
            .cancel(saga_id)
            .await
            .map_err(sqlx::Error::Protocol)?;
        if outcome == CancelOutcome::Accepted {
            crash_points::reach(point::AFTER_CANCEL_ACCEPTED).await;
            let signal = self.inner.driving.lock().unwrap().get(&saga_id).cloned();
            match signal {
                // Stored if the driver is not waiting now: it sees it at its next wait.
                Some(signal) => signal.notify_one(),
                // Nobody drives it here (its start was lost): an accepted
                // cancel must still be carried out.
                None => {
                    if let Err(err) = self.ensure_driven(saga_id).await {
                        tracing::warn!(%saga_id, error = %err, "cannot drive a cancelled saga now; it resumes at the next start");
                    }
                }
            }
            self.inner.changes.publish(SagaChange {
                saga_id,
                status: None,
            });
        }
        Ok(outcome)
    }

    /// A new span for a saga, from the definition (see [`SagaDefinition::span`]);
    /// with `resume_from`, a child of that stored `traceparent`, so that a
    /// resumed saga joins its original trace. Fills the span's `trace_id` field.
    pub fn saga_span(&self, saga_id: Uuid, resume_from: Option<&str>) -> tracing::Span {
        let span = (self.inner.definition.span)(saga_id);
        if let Some(traceparent) = resume_from.filter(|t| !t.is_empty()) {
            trace_context::adopt(&span, traceparent);
            span.record("resumed", true);
        }
        span.record("trace_id", trace_context::trace_id(&span));
        span
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

    /// The right to drive `saga_id`, unless this process already drives it.
    fn claim(&self, saga_id: Uuid) -> Option<Claim> {
        let mut driving = self.inner.driving.lock().unwrap();
        if driving.contains_key(&saga_id) {
            return None;
        }
        let cancelled = Arc::new(Notify::new());
        driving.insert(saga_id, cancelled.clone());
        Some(Claim {
            saga_id,
            cancelled,
            driving: self.inner.driving.clone(),
        })
    }

    fn resume(&self, claim: Claim, saga: OpenSaga) -> anyhow::Result<()> {
        let data: D = serde_json::from_str(&saga.data_json).map_err(|e| {
            anyhow::anyhow!("saga {} has data this build cannot read: {e}", saga.saga_id)
        })?;
        let cursor = Cursor::from_log(
            saga.status,
            saga.next_step,
            self.inner.definition.steps.len(),
        )
        .map_err(|e| anyhow::anyhow!("saga {}: {e}", saga.saga_id))?;
        let state = Driving {
            cursor,
            cancel_requested: saga.cancel_requested,
            failure_reason: saga.failure_reason,
            undid_any: saga.undid_any,
        };
        // The resumed steps join the saga's original trace.
        let span = self.saga_span(saga.saga_id, Some(&saga.trace_context));
        self.spawn_driver(claim, Arc::new(data), state, span);
        Ok(())
    }

    fn spawn_driver(&self, claim: Claim, data: Arc<D>, state: Driving, span: tracing::Span) {
        let inner = self.inner.clone();
        self.inner.drivers.spawn(
            async move {
                let Ok(_permit) = inner.permits.acquire().await else {
                    return;
                };
                let _in_flight = inner.metrics.in_flight();
                let driver = Driver::new(&inner, claim.saga_id, &data, &claim.cancelled, state);
                if driver.run().await.is_err() {
                    tracing::info!("saga interrupted by shutdown; it resumes from the log");
                }
                drop(claim);
            }
            .instrument(span),
        );
    }
}

impl<D> Inner<D> {
    pub(crate) fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// The event, if any, that this saga's kind publishes for a milestone.
    pub(crate) fn announce(
        &self,
        saga_id: Uuid,
        data: &D,
        milestone: &Milestone<'_>,
        traceparent: &str,
    ) -> Vec<NewEvent> {
        (self.definition.announce)(data, milestone)
            .map(|a| NewEvent {
                aggregate_id: saga_id,
                key: milestone.key(),
                event_type: a.event_type,
                data: a.data,
                traceparent: traceparent.to_owned(),
            })
            .into_iter()
            .collect()
    }
}
