//! The scripted test saga: three in-process steps `a`, `b` and `c` (the pivot),
//! each behaving as a real idempotent service would, attempt by attempt as
//! cued. A ledger records every effect, so tests check net effects and the
//! order of compensations.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use saga_engine::{
    Admission, Admit, Call, Engine, Milestone, RetryPolicy, SagaDefinition, SagaStatus, Started,
    Step, metrics::EngineMetrics,
};
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use tonic::Status;
use uuid::Uuid;

pub const STEPS: [&str; 3] = ["a", "b", "c"];

/// What one attempt of a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cue {
    /// Does the work and replies.
    Ok,
    /// Refuses before any work: FAILED_PRECONDITION, a definite "no".
    Refuse,
    /// Does the work, then the reply is lost (INTERNAL, as a reset stream).
    LoseReply,
    /// Fails before any work, but says nothing definite (UNAVAILABLE).
    Fail,
    /// Never answers (until the engine's deadline).
    Hang,
    /// Takes 200 ms, then refuses (a definite "no" that arrives late).
    SlowRefuse,
    /// Takes 3 ms, then does the work and replies: a window as wide as a few
    /// log commits, whatever the store's speed.
    Slow,
    /// Waits until the test opens the world's gate with this number, then
    /// does the work and replies: a step held in flight for as long as a
    /// test needs.
    Gated(usize),
}

/// The saga's input: nothing but a label; behaviour comes from the cues.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Script {
    pub label: String,
}

/// The services' state, as their stores would hold it.
#[derive(Default)]
pub struct Ledger {
    /// (saga, step) whose forward effect is in place.
    pub applied: HashSet<(Uuid, &'static str)>,
    /// (saga, step) compensated before the action ever happened: a late
    /// action is refused.
    pub tombstones: HashSet<(Uuid, &'static str)>,
    /// How often each (saga, step) took effect (must never exceed 1).
    pub effects: HashMap<(Uuid, &'static str), u32>,
    /// Compensations that undid an effect, in the order they ran.
    pub undone: Vec<(Uuid, &'static str)>,
    /// Forward calls per (saga, step).
    pub forward_calls: HashMap<(Uuid, &'static str), u32>,
}

#[derive(Default)]
pub struct World {
    pub ledger: Mutex<Ledger>,
    forward: Mutex<HashMap<(Uuid, &'static str), VecDeque<Cue>>>,
    compensation: Mutex<HashMap<(Uuid, &'static str), VecDeque<Cue>>>,
    /// The gates opened by [`World::open_gate`], which [`Cue::Gated`] steps
    /// wait for.
    gates: (Mutex<HashSet<usize>>, tokio::sync::Notify),
}

impl World {
    /// Lets every step gated on `gate` go on, now and from now on.
    pub fn open_gate(&self, gate: usize) {
        self.gates.0.lock().unwrap().insert(gate);
        self.gates.1.notify_waiters();
    }

    /// Cues the next forward attempts of `step` of `saga`; later attempts succeed.
    pub fn cue(&self, saga: Uuid, step: &'static str, cues: &[Cue]) {
        self.forward
            .lock()
            .unwrap()
            .entry((saga, step))
            .or_default()
            .extend(cues);
    }

    /// Cues the next compensation attempts (only Ok and Fail make sense).
    pub fn cue_compensation(&self, saga: Uuid, step: &'static str, cues: &[Cue]) {
        self.compensation
            .lock()
            .unwrap()
            .entry((saga, step))
            .or_default()
            .extend(cues);
    }

    /// Drops the compensation cues of `step` of `saga` not yet used: its
    /// next attempts succeed (the cause of a stuck compensation was fixed).
    pub fn clear_compensation_cues(&self, saga: Uuid, step: &'static str) {
        self.compensation.lock().unwrap().remove(&(saga, step));
    }

    /// Steps of `saga` whose effect is in place.
    pub fn net_effects(&self, saga: Uuid) -> Vec<&'static str> {
        let ledger = self.ledger.lock().unwrap();
        STEPS
            .iter()
            .copied()
            .filter(|s| ledger.applied.contains(&(saga, *s)))
            .collect()
    }

    /// The steps of `saga` undone, in the order they were undone.
    pub fn undone(&self, saga: Uuid) -> Vec<&'static str> {
        let ledger = self.ledger.lock().unwrap();
        ledger
            .undone
            .iter()
            .filter(|(id, _)| *id == saga)
            .map(|(_, s)| *s)
            .collect()
    }

    pub fn forward_calls(&self, saga: Uuid, step: &'static str) -> u32 {
        let ledger = self.ledger.lock().unwrap();
        ledger
            .forward_calls
            .get(&(saga, step))
            .copied()
            .unwrap_or(0)
    }

    /// Asserts that no (saga, step) ever took effect twice.
    pub fn assert_no_double_effect(&self) {
        let ledger = self.ledger.lock().unwrap();
        for (key, count) in &ledger.effects {
            assert!(*count <= 1, "{key:?} took effect {count} times");
        }
    }

    /// Marks the forward effect of `step` in place, as a crash after the
    /// callee committed would leave it.
    pub fn apply_behind_the_log(&self, saga: Uuid, step: &'static str) {
        let mut ledger = self.ledger.lock().unwrap();
        ledger.applied.insert((saga, step));
        *ledger.effects.entry((saga, step)).or_default() += 1;
    }

    fn next(
        &self,
        cues: &Mutex<HashMap<(Uuid, &'static str), VecDeque<Cue>>>,
        key: (Uuid, &'static str),
    ) -> Cue {
        cues.lock()
            .unwrap()
            .get_mut(&key)
            .and_then(|q| q.pop_front())
            .unwrap_or(Cue::Ok)
    }
}

struct ScriptedStep {
    name: &'static str,
    world: Arc<World>,
}

#[async_trait::async_trait]
impl Step<Script> for ScriptedStep {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn forward(&self, _: &Script, call: &Call) -> Result<String, Status> {
        let key = (call.saga_id, self.name);
        let cue = self.world.next(&self.world.forward, key);
        *self
            .world
            .ledger
            .lock()
            .unwrap()
            .forward_calls
            .entry(key)
            .or_default() += 1;
        match cue {
            Cue::Fail => return Err(Status::unavailable("failed on cue")),
            Cue::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                unreachable!()
            }
            Cue::SlowRefuse => tokio::time::sleep(Duration::from_millis(200)).await,
            Cue::Slow => tokio::time::sleep(Duration::from_millis(3)).await,
            Cue::Gated(gate) => loop {
                let opened = self.world.gates.1.notified();
                if self.world.gates.0.lock().unwrap().contains(&gate) {
                    break;
                }
                opened.await;
            },
            Cue::Ok | Cue::LoseReply | Cue::Refuse => {}
        }
        {
            let mut ledger = self.world.ledger.lock().unwrap();
            if ledger.tombstones.contains(&key) {
                // Compensated before it happened: a late action is refused.
                return Err(Status::failed_precondition(
                    "compensated before it happened",
                ));
            }
            // Idempotent: a request_id that took effect before replays its
            // answer, even after a compensation, and never takes effect again.
            let seen = ledger.effects.contains_key(&key);
            if !seen && matches!(cue, Cue::Refuse | Cue::SlowRefuse) {
                return Err(Status::failed_precondition("refused on cue"));
            }
            if !seen {
                ledger.applied.insert(key);
                *ledger.effects.entry(key).or_default() += 1;
            }
        }
        match cue {
            Cue::LoseReply => Err(Status::internal("h2 protocol error: stream reset")),
            _ => Ok(format!("{} done", self.name)),
        }
    }

    async fn compensate(&self, _: &Script, call: &Call) -> Result<String, Status> {
        let key = (call.saga_id, self.name);
        if self.world.next(&self.world.compensation, key) == Cue::Fail {
            return Err(Status::unavailable("compensation failed on cue"));
        }
        let mut ledger = self.world.ledger.lock().unwrap();
        if ledger.applied.remove(&key) {
            ledger.undone.push(key);
            Ok(format!("{} undone", self.name))
        } else {
            ledger.tombstones.insert(key);
            Ok("nothing to undo".into())
        }
    }
}

fn span(saga_id: Uuid) -> tracing::Span {
    tracing::info_span!(
        "saga",
        saga_id = %saga_id,
        trace_id = tracing::field::Empty,
        resumed = tracing::field::Empty
    )
}

fn announce(_: &Script, milestone: &Milestone<'_>) -> Option<saga_engine::Announcement> {
    let event_type = match milestone {
        Milestone::Started => "test.started".to_owned(),
        Milestone::Finished { status, .. } => format!("test.{}", status.as_str().to_lowercase()),
        Milestone::CompensationStuck { .. } => "test.compensation_stuck".to_owned(),
    };
    Some(saga_engine::Announcement {
        event_type,
        data: serde_json::Map::new(),
    })
}

pub fn definition(world: &Arc<World>) -> SagaDefinition<Script> {
    SagaDefinition {
        kind: "scripted",
        steps: STEPS
            .iter()
            .map(|name| {
                Arc::new(ScriptedStep {
                    name,
                    world: world.clone(),
                }) as Arc<dyn Step<Script>>
            })
            .collect(),
        pivot: Some("c"),
        span,
        announce,
    }
}

/// Fast retries, a small budget and a short deadline.
pub fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        call_timeout: Duration::from_millis(300),
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(10),
        max_compensation_backoff: Duration::from_millis(10),
        compensation_stuck_after: Duration::from_secs(60),
        compensation_attention_after: None,
    }
}

pub fn engine(world: &Arc<World>, pool: &AnyPool, policy: RetryPolicy) -> Engine<Script> {
    engine_with_metrics(world, pool, policy, EngineMetrics::default())
}

/// An engine that counts into `metrics` (a clone reads the same counters).
pub fn engine_with_metrics(
    world: &Arc<World>,
    pool: &AnyPool,
    policy: RetryPolicy,
    metrics: EngineMetrics,
) -> Engine<Script> {
    Engine::new(definition(world), pool.clone(), policy, 1_000, metrics).unwrap()
}

/// An engine as one replica, `id`, with `lease`, on the PostgreSQL `pool`.
/// It has joined the others (and resumed what was its to resume).
pub async fn replica(
    world: &Arc<World>,
    pool: &AnyPool,
    policy: RetryPolicy,
    id: &str,
    lease: Duration,
) -> Engine<Script> {
    let engine = Engine::with_ownership(
        definition(world),
        pool.clone(),
        policy,
        1_000,
        EngineMetrics::default(),
        saga_engine::Ownership::Replica(saga_engine::ReplicaSettings {
            id: id.into(),
            lease,
            database_url: pool.connect_options().database_url.to_string(),
        }),
        saga_engine::log::Durability::Full,
    )
    .unwrap();
    engine.recover().await.unwrap();
    engine
}

/// Starts a saga and returns its ID.
pub async fn start(engine: &Engine<Script>) -> Uuid {
    let id = Uuid::new_v4();
    start_id(engine, id).await;
    id
}

/// Cues `saga` with `cue` on `world`, then starts it.
pub async fn start_with(
    engine: &Engine<Script>,
    saga: Uuid,
    cue: impl FnOnce(&World),
    world: &World,
) -> Uuid {
    cue(world);
    start_id(engine, saga).await;
    saga
}

/// Starts `saga` with step c refused and every undo of b failing, and
/// waits until it rests NEEDS_ATTENTION (the engine's policy must give up
/// on stuck compensations: `compensation_attention_after`).
pub async fn rest_needing_attention(
    engine: &Engine<Script>,
    saga: Uuid,
    world: &World,
    pool: &AnyPool,
) {
    start_with(
        engine,
        saga,
        |w| {
            w.cue(saga, "c", &[Cue::Refuse]);
            w.cue_compensation(saga, "b", &[Cue::Fail; 10_000]);
        },
        world,
    )
    .await;
    assert_eq!(terminal(pool, saga).await, SagaStatus::NeedsAttention);
}

async fn start_id(engine: &Engine<Script>, id: Uuid) {
    let started = engine
        .start(
            id,
            Script {
                label: "test".into(),
            },
            AdmitAll,
        )
        .await
        .unwrap();
    assert_eq!(started, Started::Started);
}

/// The scripted saga has no rows of its own: every start is admitted.
struct AdmitAll;

impl Admit for AdmitAll {
    fn admit<'c>(
        &'c self,
        _: &'c mut sqlx::AnyConnection,
        _: i64,
    ) -> futures::future::BoxFuture<'c, Result<Admission, sqlx::Error>> {
        Box::pin(async { Ok(Admission::Admit) })
    }

    fn admit_sqlite(&self, _: &rusqlite::Connection, _: i64) -> rusqlite::Result<Admission> {
        Ok(Admission::Admit)
    }
}

/// The saga's status in the log.
pub async fn status(pool: &AnyPool, saga: Uuid) -> SagaStatus {
    let status: String = sqlx::query_scalar("SELECT status FROM sagas WHERE saga_id = $1")
        .bind(saga.to_string())
        .fetch_one(pool)
        .await
        .unwrap();
    SagaStatus::parse(&status).unwrap()
}

/// Waits (at most 30 s) for the saga to end, and returns how.
pub async fn terminal(pool: &AnyPool, saga: Uuid) -> SagaStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = status(pool, saga).await;
        if status.is_terminal() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga {saga} still {status:?} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (at most 10 s) until the saga is `want`; else fails, saying
/// what it still is 10 s `after` what.
pub async fn until_status(pool: &AnyPool, saga: Uuid, want: SagaStatus, after: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = status(pool, saga).await;
        if status == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the saga is still {status:?} 10 s after {after}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The invariants every terminal saga must meet.
pub fn assert_consistent(world: &World, saga: Uuid, status: SagaStatus) {
    world.assert_no_double_effect();
    let net = world.net_effects(saga);
    match status {
        SagaStatus::Completed => {
            assert_eq!(net, STEPS.to_vec(), "a completed saga has every effect")
        }
        SagaStatus::Compensated | SagaStatus::Cancelled | SagaStatus::Failed => {
            assert!(
                net.is_empty(),
                "a {status:?} saga has no effect left: {net:?}"
            )
        }
        open => panic!("saga {saga} is not terminal: {open:?}"),
    }
    // Compensations ran in reverse order.
    let undone = world.undone(saga);
    let mut reversed = undone.clone();
    reversed.sort_by_key(|s| std::cmp::Reverse(STEPS.iter().position(|x| x == s)));
    assert_eq!(undone, reversed, "compensations run in reverse order");
}
