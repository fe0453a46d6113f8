//! The engine's handle: start a saga, make sure one is driven, resume every
//! open saga after a crash, cancel, watch, and shut down.
//!
//! Each saga is driven by at most one task in this process (see [`Holds`]);
//! a [`driver`](crate::driver) runs its steps. With several replicas on one
//! database ([`Ownership::Replica`]), by one replica at a time: see
//! [`crate::replicas`]. Starting is one call that
//! records the saga, the caller's own rows and the saga's first event in one
//! transaction, and then drives it, on a task of its own: a caller that goes
//! away after the commit (its client reset the stream, its deadline passed)
//! can't leave a saga that nothing drives.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use sqlx::AnyPool;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::task::TaskTracker;
use trace_ids::SpanTraceExt;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    changes::{Changes, SagaChange, SagaWatch},
    crash_points::{self, point},
    cursor::Cursor,
    definition::{Milestone, SagaDefinition},
    driver::{Driver, Driving, Stopped},
    events::NewEvent,
    holds::{Claim, Holds, LookAgain},
    log::{
        self, Admit, CancelOutcome, Durability, FIRST_EPOCH, LogWriter, NewSaga, OpenSaga, Reopen,
        ReopenOutcome, SagaStatus, SagaView, SqliteLog, SqliteReader, Start,
        kept::{Kept, on_kept},
    },
    metrics::EngineMetrics,
    notifications::{self, Heard},
    replicas::{self, Renewal, ReplicaSettings},
    retry::RetryPolicy,
    trace_context,
};

/// Who else may drive sagas in the engine's store.
#[derive(Debug, Clone)]
pub enum Ownership {
    /// This process alone (a SQLite file, which one process uses at a time;
    /// a test): every open saga in the store is its own to resume.
    Alone,
    /// One replica among several on one PostgreSQL database: it drives the
    /// sagas it starts and those it claims from replicas that died or left.
    Replica(ReplicaSettings),
}

/// The owner recorded for sagas when the engine runs alone.
const ALONE: &str = "local";

/// Most connections kept for reading views (of the pool's; on PostgreSQL).
/// Views are read once per waiting `CreateOrder`, as its saga ends.
const KEPT_READERS: usize = 4;

/// Most orphaned sagas claimed in one sweep.
const CLAIM_BATCH: i64 = 1_000;
/// Longest a joining replica waits for its first LISTEN before it goes on.
const LISTEN_SET_UP: Duration = Duration::from_secs(10);

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
    /// On PostgreSQL: the connections of the last views read, kept for the
    /// next (see [`Kept`]).
    readers: Kept,
    pub(crate) policy: RetryPolicy,
    /// Bounds the sagas driven at once; the rest wait for a permit.
    permits: Semaphore,
    max_in_flight: usize,
    pub(crate) changes: Changes,
    pub(crate) stopping: watch::Sender<bool>,
    drivers: TaskTracker,
    pub(crate) metrics: EngineMetrics,
    /// The sagas this process holds: drives, or looks at before driving.
    holds: Holds,
    /// Set in replica mode.
    replica: Option<ReplicaSettings>,
    /// This process's life as a replica: tells a restart from its predecessor.
    incarnation: Uuid,
    /// Why this replica had to stop, if another process took its ID.
    lost: watch::Sender<Option<String>>,
    /// Wakes the sweeper before its tick (a replica released its sagas).
    sweep_now: Notify,
    /// Sagas this build can't read: not claimed again at every sweep.
    unreadable: Mutex<HashSet<Uuid>>,
    /// The replica's background tasks run (they are started once).
    joined: std::sync::atomic::AtomicBool,
}

/// What a holder that lets go of a saga left to it does, for the engine
/// `inner` will be: a task that makes sure the saga is driven if it is open
/// ([`Holds`]), unless the engine stops or is gone.
fn looks_again<D>(inner: Weak<Inner<D>>) -> LookAgain
where
    D: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    Arc::new(move |saga_id| {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = inner.clone();
        runtime.spawn(async move {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if *inner.stopping.borrow() {
                return;
            }
            if let Err(err) = (Engine { inner }).drive_if_undriven(saga_id).await {
                tracing::warn!(%saga_id, error = %err, "cannot look again at a saga its holder let go of; it resumes at the next start");
            }
        });
    })
}

impl<D> Engine<D>
where
    D: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// An engine for `definition` on `pool`, whose tables must exist, that
    /// runs [`Ownership::Alone`], its log's commits waiting for the disk
    /// ([`Durability::Full`]). Fails if the definition is malformed.
    pub fn new(
        definition: SagaDefinition<D>,
        pool: AnyPool,
        policy: RetryPolicy,
        max_in_flight: usize,
        metrics: EngineMetrics,
    ) -> anyhow::Result<Self> {
        Self::with_ownership(
            definition,
            pool,
            policy,
            max_in_flight,
            metrics,
            Ownership::Alone,
            Durability::Full,
        )
    }

    /// An engine that runs alone or as one replica of several; replicas need
    /// PostgreSQL. The log's commits wait for the disk as `durability` says.
    pub fn with_ownership(
        definition: SagaDefinition<D>,
        pool: AnyPool,
        policy: RetryPolicy,
        max_in_flight: usize,
        metrics: EngineMetrics,
        ownership: Ownership,
        durability: Durability,
    ) -> anyhow::Result<Self> {
        definition.validate().map_err(anyhow::Error::msg)?;
        let replica = match ownership {
            Ownership::Alone => None,
            Ownership::Replica(replica) => {
                anyhow::ensure!(
                    pool.connect_options()
                        .database_url
                        .scheme()
                        .starts_with("postgres"),
                    "replicas share a PostgreSQL database; this store is {}",
                    pool.connect_options().database_url.scheme()
                );
                anyhow::ensure!(!replica.id.is_empty(), "a replica needs a non-empty ID");
                Some(replica)
            }
        };
        let incarnation = Uuid::new_v4();
        let log = LogWriter::spawn(
            pool.clone(),
            replica.as_ref().map(|_| incarnation),
            durability,
        )?;
        let reader = SqliteLog::file_of(&pool)
            .map(|file| SqliteReader::open(&file))
            .transpose()?;
        Ok(Engine {
            inner: Arc::new_cyclic(|inner| Inner {
                log,
                reader,
                readers: Kept::new(pool.clone(), KEPT_READERS),
                definition,
                pool,
                policy,
                permits: Semaphore::new(max_in_flight),
                max_in_flight,
                changes: Changes::new(),
                stopping: watch::channel(false).0,
                drivers: TaskTracker::new(),
                metrics,
                holds: Holds::new(looks_again(inner.clone())),
                replica,
                incarnation,
                lost: watch::channel(None).0,
                sweep_now: Notify::new(),
                unreadable: Mutex::default(),
                joined: Default::default(),
            }),
        })
    }

    /// This engine's replica ID (the owner it records on its sagas).
    pub fn replica_id(&self) -> &str {
        self.inner.owner()
    }

    /// Resolves if this engine must stop: as a replica, another process
    /// registered under its ID; with relaxed commits on PostgreSQL, the
    /// server recovered from a crash and may have lost commits the drivers
    /// went on from (the log's writer halted). Its process should exit and start again,
    /// to recover from the database. Never resolves otherwise.
    pub async fn lost(&self) -> String {
        tokio::select! {
            reason = log::once_set(self.inner.lost.subscribe()) => reason,
            reason = self.inner.log.halted() => reason,
        }
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

    /// A saga with its step history, as shown to users: the step it runs
    /// now among them (see [`SagaView::running_step`]) when it is of this
    /// engine's kind.
    pub async fn view(&self, saga_id: Uuid) -> Result<Option<SagaView>, sqlx::Error> {
        let view = match &self.inner.reader {
            Some(reader) => reader
                .run(move |conn| log::load_sqlite_view(conn, saga_id))
                .await
                .map_err(sqlx::Error::Protocol)?,
            None => on_kept!(&self.inner.readers, |conn| log::load_view(conn, saga_id)).await?,
        };
        let definition = &self.inner.definition;
        Ok(view.map(|view| match view.kind == definition.kind {
            true => view.with_running_step(&definition.step_names()),
            // Another kind's saga in the same store: its steps are not ours.
            false => view,
        }))
    }

    /// The events a saga emitted and the operators' actions on it.
    pub async fn history(&self, saga_id: Uuid) -> Result<log::history::SagaHistory, sqlx::Error> {
        log::history::load_history(&self.inner.pool, saga_id).await
    }

    /// How many sagas rest in each status (every status, zeros included).
    pub async fn count_by_status(&self) -> Result<Vec<(SagaStatus, i64)>, sqlx::Error> {
        log::history::count_by_status(&self.inner.pool).await
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
        let events = inner.announce(
            saga_id,
            log::FIRST_EPOCH,
            &data,
            &Milestone::Started,
            &traceparent,
        );
        let start = Start {
            saga: NewSaga {
                saga_id,
                kind: inner.definition.kind,
                data_json,
                trace_context: traceparent,
                starts_at_pivot: inner.definition.pivot_index() == Some(0),
                owner: inner.owner().to_owned(),
                at_ms: crate::now_ms(),
            },
            admit,
            events,
        };
        // The saga as the log records it: the driver keeps it so, and tells
        // its end with it (see `SagaChange::view`), while someone waits for
        // it from the start (a `CreateOrder` that waits). Kept for every
        // saga, it cost 1.4 KB each (10,000 in flight: 122 → 136 MB); one
        // watched later reads the log.
        let mut recorded = inner
            .changes
            .is_watched(saga_id)
            .then(|| SagaView::recorded(&start.saga));
        match inner.log.start(start).await {
            Ok(Admission::Admit) => {}
            Ok(Admission::Refuse) => return Ok(Started::Refused),
            Err(err) => {
                // The reply to COMMIT may be lost after the commit is durable:
                // then the saga exists and must be driven like any other.
                if inner.log.is_halted() {
                    // The process is about to stop: the caller may try again
                    // once it is back (UNAVAILABLE). Had this commit landed
                    // before the crash, the restart recovers the saga and the
                    // retry, under the same request ID, finds it.
                    return Err(sqlx::Error::Io(std::io::Error::other(err)));
                }
                let stored = log::load_one_open(&inner.pool, inner.definition.kind, saga_id).await;
                if !matches!(stored, Ok(Some(_))) {
                    return Err(sqlx::Error::Protocol(err));
                }
                tracing::warn!(%saga_id, error = %err, "the commit of a new saga reported an error, but it is stored; driving it");
                recorded = None;
            }
        }
        crash_points::reach(point::AFTER_START_COMMIT).await;
        span.in_scope(|| tracing::info!("saga recorded; driving it"));
        inner.metrics.started();
        inner.changes.publish(SagaChange {
            saga_id,
            status: Some(SagaStatus::Running),
            view: None,
        });
        let state = Driving::new(
            Cursor::Forward {
                step: 0,
                maybe_sent: false,
            },
            FIRST_EPOCH,
        );
        self.spawn_driver(claim, Arc::new(data), state, recorded, span);
        Ok(Started::Started)
    }

    /// Makes sure an open saga is driven: if nobody drives it (its start was
    /// lost, or, with replicas, its owner died), this process resumes it from
    /// the log. A saga a live replica drives is left to it. Returns whether it
    /// had to be resumed.
    ///
    /// It runs on a task of its own, as [`Engine::cancel`] does: a caller
    /// that leaves (a client's replay whose deadline passed) does not take
    /// the look with it, half done, its saga still undriven.
    pub async fn ensure_driven(&self, saga_id: Uuid) -> Result<bool, sqlx::Error> {
        let engine = self.clone();
        detached("looking at", saga_id, async move {
            engine.drive_if_undriven(saga_id).await
        })
        .await
    }

    /// [`Engine::ensure_driven`], in the caller's future.
    async fn drive_if_undriven(&self, saga_id: Uuid) -> Result<bool, sqlx::Error> {
        let Some(claim) = self.claim(saga_id) else {
            return Ok(false);
        };
        let inner = &self.inner;
        if let Some(replica) = &inner.replica
            && replicas::claim_one(&inner.pool, replica, inner.definition.kind, saga_id)
                .await?
                .is_none()
        {
            return Ok(false);
        }
        let open = log::load_one_open(&inner.pool, inner.definition.kind, saga_id).await?;
        let Some(open) = open else {
            return Ok(false);
        };
        tracing::warn!(%saga_id, "an open saga was not being driven; resuming it");
        self.resume(claim, open)
            .map_err(|e| sqlx::Error::Decode(e.into()))?;
        Ok(true)
    }

    /// Resumes every open saga of this definition that is this process's to
    /// drive. Alone, that is every open saga in the store. As a replica, it
    /// first joins the others (a lease of its own, the listener for their
    /// changes, the sweeper that takes over the sagas of replicas that die),
    /// then takes back the sagas recorded under its own ID and those whose
    /// owner's lease ran out. Returns how many it resumed.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        let inner = &self.inner;
        inner.log.arm().await?;
        let Some(replica) = &inner.replica else {
            let open = log::load_open(&inner.pool, inner.definition.kind).await?;
            let mut resumed = 0;
            for saga in open {
                if let Some(claim) = self.claim(saga.saga_id) {
                    resumed += usize::from(self.resume_or_log(claim, saga));
                }
            }
            return Ok(resumed);
        };
        if let Some(left_ms) = replicas::live_predecessor(&inner.pool, replica).await? {
            tracing::warn!(
                replica = %replica.id,
                lease_left_ms = left_ms,
                "this replica ID still holds a lease: taking its sagas back now (a restart after a crash). \
                 If another process runs under this ID, it stops: give each replica its own ID"
            );
        }
        replicas::register(&inner.pool, replica, inner.incarnation).await?;
        if !inner.joined.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // A replica hears the others before it counts as joined: a
            // release or a cancel sent while its LISTEN was still being set
            // up (a TLS handshake takes a while) would be lost, and a
            // hand-over wait for a whole lease.
            let listening = self.spawn_replica_tasks(replica.clone());
            if tokio::time::timeout(LISTEN_SET_UP, listening)
                .await
                .is_err()
            {
                tracing::warn!(
                    "not yet listening for the other replicas' changes after {LISTEN_SET_UP:?}; going on, hand-overs wait for leases until it does"
                );
            }
        }
        let own = replicas::claim_own(&inner.pool, replica, inner.definition.kind).await?;
        let mut resumed = self.resume_claimed(own).await;
        resumed += self.sweep(replica).await?;
        Ok(resumed)
    }

    /// Asks to cancel a saga. An accepted cancel is durable before this
    /// returns, and the saga then ends CANCELLED, whatever else happens; its
    /// driver stops retrying a step whose outcome is still unknown.
    ///
    /// It runs on a task of its own, as [`Engine::start`] does: what follows
    /// the commit (waking the driver, or driving a saga nobody drives) is
    /// carried out even if the caller is dropped once the log has it.
    pub async fn cancel(&self, saga_id: Uuid) -> Result<CancelOutcome, sqlx::Error> {
        let engine = self.clone();
        detached("cancelling", saga_id, async move {
            engine.record_cancel(saga_id).await
        })
        .await
    }

    async fn record_cancel(&self, saga_id: Uuid) -> Result<CancelOutcome, sqlx::Error> {
        let outcome = self
            .inner
            .log
            .cancel(saga_id)
            .await
            .map_err(sqlx::Error::Protocol)?;
        if outcome == CancelOutcome::Accepted {
            crash_points::reach(point::AFTER_CANCEL_ACCEPTED).await;
            let signal = self.inner.holds.left_to_holder(saga_id);
            match signal {
                // Stored if the driver is not waiting now: it sees it at its next wait.
                Some(signal) => signal.notify_one(),
                // Nobody drives it here (its start was lost): an accepted
                // cancel must still be carried out.
                None => {
                    if let Err(err) = self.drive_if_undriven(saga_id).await {
                        tracing::warn!(%saga_id, error = %err, "cannot drive a cancelled saga now; it resumes at the next start");
                    }
                }
            }
            self.inner.changes.publish(SagaChange {
                saga_id,
                status: None,
                view: None,
            });
        }
        Ok(outcome)
    }

    /// Carries out an operator's action on a saga that rests NEEDS_ATTENTION
    /// (see [`Reopen`]). Durable before this returns; the saga is then driven
    /// here, from the compensation that failed or, resolved by hand, from
    /// the one before it. A replay of the action's request_id changes nothing,
    /// but makes sure the saga is driven if it is still open (the first
    /// call's driving may have failed, or its process died).
    ///
    /// It runs on a task of its own, as [`Engine::start`] does: the saga is
    /// driven even if the caller is dropped once the log has the action
    /// (before, it was left COMPENSATING with no driver until the next start).
    pub async fn reopen(&self, action: Reopen) -> Result<ReopenOutcome, sqlx::Error> {
        let engine = self.clone();
        detached("reopening", action.saga_id, async move {
            engine.record_reopen(action).await
        })
        .await
    }

    async fn record_reopen(&self, action: Reopen) -> Result<ReopenOutcome, sqlx::Error> {
        let saga_id = action.saga_id;
        let owner = self
            .inner
            .replica
            .as_ref()
            .map(|replica| replica.id.clone())
            .unwrap_or_default();
        let outcome = self
            .inner
            .log
            .reopen(action, owner)
            .await
            .map_err(sqlx::Error::Protocol)?;
        if outcome == ReopenOutcome::Reopened {
            // Told before its driver starts, which may end it again at once:
            // the end it tells then comes after.
            self.inner
                .changes
                .reopened(saga_id, SagaStatus::Compensating);
        }
        if matches!(outcome, ReopenOutcome::Reopened | ReopenOutcome::Replayed)
            && let Err(err) = self.drive_if_undriven(saga_id).await
        {
            tracing::warn!(%saga_id, error = %err, "cannot drive a reopened saga now; it resumes at the next start");
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
        span.record("trace_id", span.trace_id());
        span
    }

    /// Stops starting new calls, then waits up to `grace` for drivers to reach a
    /// checkpoint. Whatever is still in flight after that is left to recovery.
    /// A replica then hands its open sagas over: it releases them and its
    /// lease at once, and the other replicas take them without waiting for
    /// the lease to run out.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.stopping.send_replace(true);
        inner.drivers.close();
        if tokio::time::timeout(grace, inner.drivers.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = inner.drivers.len(),
                "sagas still in flight at shutdown; they resume from the log"
            );
        }
        let Some(replica) = &inner.replica else {
            return;
        };
        if inner.lost.borrow().is_some() {
            return;
        }
        match replicas::release(
            &inner.pool,
            replica,
            inner.incarnation,
            inner.definition.kind,
        )
        .await
        {
            Ok(released) => {
                tracing::info!(
                    released,
                    "handed this replica's open sagas over to the others"
                )
            }
            Err(err) => tracing::warn!(
                error = %err,
                "cannot hand the open sagas over; the others take them when this replica's lease runs out"
            ),
        }
    }

    /// How many sagas this engine holds that wait for a slot to be driven
    /// in (past `max_in_flight`): a queue that only grows under overload.
    pub fn waiting(&self) -> usize {
        let in_flight = self.inner.max_in_flight - self.inner.permits.available_permits();
        self.inner.holds.len().saturating_sub(in_flight)
    }

    /// The right to drive `saga_id`, unless this process holds it already
    /// (see [`Holds::claim`]).
    fn claim(&self, saga_id: Uuid) -> Option<Claim> {
        self.inner.holds.claim(saga_id)
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
            epoch: saga.epoch,
        };
        // The resumed steps join the saga's original trace.
        let span = self.saga_span(saga.saga_id, Some(&saga.trace_context));
        self.spawn_driver(claim, Arc::new(data), state, None, span);
        Ok(())
    }

    /// Resumes `saga`; one saga this build can't read must not keep every
    /// other one from resuming: it stays open, visible, and is logged.
    fn resume_or_log(&self, claim: Claim, saga: OpenSaga) -> bool {
        let saga_id = saga.saga_id;
        match self.resume(claim, saga) {
            Ok(()) => true,
            Err(err) => {
                self.inner.unreadable.lock().unwrap().insert(saga_id);
                tracing::error!(%saga_id, error = %err, "cannot resume a saga; it stays open");
                false
            }
        }
    }

    /// Resumes sagas this replica just claimed, each at its new epoch.
    async fn resume_claimed(&self, claimed: Vec<(Uuid, i64)>) -> usize {
        let inner = &self.inner;
        let kind = inner.definition.kind;
        // Many at once (a restart, a takeover): one read of every open saga
        // rather than one read each.
        let bulk = claimed.len() > 16;
        let mut loaded: HashMap<Uuid, OpenSaga> = HashMap::new();
        if bulk {
            match log::load_open(&inner.pool, kind).await {
                Ok(open) => loaded = open.into_iter().map(|s| (s.saga_id, s)).collect(),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the claimed sagas; the sweep takes them up again");
                    return 0;
                }
            }
        }
        let mut resumed = 0;
        for (saga_id, epoch) in claimed {
            // Driven here already by a driver at an older epoch: it is fenced
            // at its next write, and the sweep takes the saga up again.
            let Some(claim) = self.claim(saga_id) else {
                continue;
            };
            let saga = if bulk {
                Ok(loaded.remove(&saga_id))
            } else {
                log::load_one_open(&inner.pool, kind, saga_id).await
            };
            match saga {
                Ok(Some(saga)) if saga.epoch == epoch => {
                    resumed += usize::from(self.resume_or_log(claim, saga))
                }
                // Ended or claimed again since: nothing to drive.
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(%saga_id, error = %err, "cannot read a claimed saga; the sweep takes it up again")
                }
            }
        }
        resumed
    }

    /// Takes over the open sagas of replicas whose lease ran out, and any of
    /// this replica's own that nothing here drives. Returns how many it resumed.
    async fn sweep(&self, replica: &ReplicaSettings) -> Result<usize, sqlx::Error> {
        let inner = &self.inner;
        let kind = inner.definition.kind;
        let mut resumed = 0;
        loop {
            let orphans = replicas::claim_orphans(&inner.pool, replica, kind, CLAIM_BATCH).await?;
            let full = orphans.len() as i64 == CLAIM_BATCH;
            if !orphans.is_empty() {
                tracing::info!(
                    sagas = orphans.len(),
                    "taking over the open sagas of replicas whose lease ran out"
                );
                inner.metrics.taken_over(orphans.len() as u64);
            }
            resumed += self.resume_claimed(orphans).await;
            if !full {
                break;
            }
        }
        let idle = replicas::own_idle(&inner.pool, replica, kind).await?;
        for saga_id in idle {
            let driven = inner.holds.holds(saga_id);
            if driven || inner.unreadable.lock().unwrap().contains(&saga_id) {
                continue;
            }
            if let Some(epoch) = replicas::claim_one(&inner.pool, replica, kind, saga_id).await? {
                resumed += self.resume_claimed(vec![(saga_id, epoch)]).await;
            }
        }
        Ok(resumed)
    }

    /// The replica's background work: renew its lease, listen for the other
    /// replicas' changes, and sweep for sagas nobody drives.
    /// Returns what hears once the listener listens.
    fn spawn_replica_tasks(&self, replica: ReplicaSettings) -> tokio::sync::oneshot::Receiver<()> {
        let database_url = replica.database_url.clone();
        let engine = self.clone();
        let tick = replica.tick();
        tokio::spawn(async move {
            let inner = &engine.inner;
            let mut stopping = inner.stopping.subscribe();
            let mut next_sweep = tokio::time::Instant::now() + tick;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next_sweep) => {}
                    () = inner.sweep_now.notified() => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
                next_sweep = tokio::time::Instant::now() + tick;
                match replicas::renew(&inner.pool, &replica, inner.incarnation).await {
                    Ok(Renewal::Renewed) => {}
                    Ok(Renewal::Superseded) => {
                        let reason = format!(
                            "another process registered as replica {:?}: this one stops driving sagas; \
                             give each replica its own ID",
                            replica.id
                        );
                        tracing::error!("{reason}");
                        inner.stopping.send_replace(true);
                        inner.lost.send_replace(Some(reason));
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot renew this replica's lease; retrying");
                        continue;
                    }
                }
                if let Err(err) = engine.sweep(&replica).await {
                    tracing::warn!(error = %err, "cannot look for sagas nobody drives; retrying");
                }
            }
        });

        let engine = self.clone();
        let stopping = self.inner.stopping.subscribe();
        let (listening, heard_listening) = tokio::sync::oneshot::channel();
        tokio::spawn(notifications::listen(
            database_url,
            self.inner.incarnation,
            stopping,
            Some(listening),
            move |heard| engine.heard(heard),
        ));
        heard_listening
    }

    /// What the listener heard from the other replicas.
    fn heard(&self, heard: Heard) {
        let inner = &self.inner;
        match heard {
            Heard::Changes(notices) => {
                for notice in notices {
                    if notice.cancel
                        && let Some(signal) = inner.holds.left_to_holder(notice.saga_id)
                    {
                        signal.notify_one();
                    }
                    inner.changes.publish(SagaChange {
                        saga_id: notice.saga_id,
                        status: notice.status,
                        view: None,
                    });
                }
            }
            Heard::Release => inner.sweep_now.notify_one(),
            Heard::Reconnected => inner.changes.publish_all(),
        }
    }

    /// `recorded`: the saga as the log holds it, when this engine recorded
    /// it (a saga resumed from the log has none).
    fn spawn_driver(
        &self,
        claim: Claim,
        data: Arc<D>,
        state: Driving,
        recorded: Option<SagaView>,
        span: tracing::Span,
    ) {
        let inner = self.inner.clone();
        self.inner.drivers.spawn(
            async move {
                let Ok(_permit) = inner.permits.acquire().await else {
                    return;
                };
                let _in_flight = inner.metrics.in_flight();
                let driver = Driver::new(
                    &inner,
                    claim.saga_id,
                    &data,
                    &claim.cancelled,
                    state,
                    recorded,
                );
                match driver.run().await {
                    Ok(()) => {}
                    Err(Stopped::Interrupted) => {
                        tracing::info!("saga interrupted by shutdown; it resumes from the log")
                    }
                    Err(Stopped::Fenced) => inner.metrics.fenced(),
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

    /// The owner this engine records on the sagas it starts.
    fn owner(&self) -> &str {
        self.replica.as_ref().map_or(ALONE, |r| r.id.as_str())
    }

    /// The event, if any, that this saga's kind publishes for a milestone.
    pub(crate) fn announce(
        &self,
        saga_id: Uuid,
        epoch: i64,
        data: &D,
        milestone: &Milestone<'_>,
        traceparent: &str,
    ) -> Vec<NewEvent> {
        (self.definition.announce)(data, milestone)
            .map(|a| NewEvent {
                aggregate_id: saga_id,
                key: milestone.key(epoch),
                event_type: a.event_type,
                data: a.data,
                traceparent: traceparent.to_owned(),
            })
            .into_iter()
            .collect()
    }
}

/// Runs an operator's or a client's `work` on `saga_id` (what `doing` names)
/// on a task of its own, in the caller's span: what follows its commit is
/// carried out even if the caller is dropped once the log has it.
async fn detached<T: Send + 'static>(
    doing: &str,
    saga_id: Uuid,
    work: impl Future<Output = Result<T, sqlx::Error>> + Send + 'static,
) -> Result<T, sqlx::Error> {
    tokio::spawn(work.instrument(tracing::Span::current()))
        .await
        .map_err(|e| sqlx::Error::Protocol(format!("{doing} saga {saga_id} failed: {e}")))?
}
