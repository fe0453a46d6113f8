//! Several engines as replicas on one PostgreSQL database: each open saga is
//! driven by one of them at a time; a replica that dies or leaves has its
//! sagas taken over; one that lost a saga can no longer write to it; changes
//! and cancels reach every replica.

use std::{sync::Arc, time::Duration};

use saga_engine::{CancelOutcome, SagaStatus};
use sqlx::AnyPool;
use uuid::Uuid;

use crate::{
    scripted::{self, Cue, World},
    store::{self, Backend},
};

const SHORT_LEASE: Duration = Duration::from_millis(500);
/// Long enough that nothing in a test waits for it to run out.
const LONG_LEASE: Duration = Duration::from_secs(120);

/// Waits (at most 10 s) until `check` holds.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn owner_and_epoch(pool: &AnyPool, saga: Uuid) -> (String, i64) {
    sqlx::query_as("SELECT owner, epoch FROM sagas WHERE saga_id = $1")
        .bind(saga.to_string())
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The epochs of the saga's step records, in the order the saga wrote them.
async fn step_epochs(pool: &AnyPool, saga: Uuid) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT phase, name, epoch FROM saga_steps WHERE saga_id = $1 \
         ORDER BY started_at_ms, phase DESC, step_index",
    )
    .bind(saga.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
}

fn slow_policy() -> saga_engine::RetryPolicy {
    let mut policy = scripted::policy();
    policy.call_timeout = Duration::from_secs(30);
    policy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_leaves_alone_a_saga_a_live_one_drives() {
    let store = store::fresh(Backend::Postgres).await;
    let world = Arc::new(World::default());
    let first = scripted::replica(&world, &store.pool, slow_policy(), "a", LONG_LEASE).await;
    let saga = Uuid::new_v4();
    scripted::start_with(&first, saga, |w| w.cue(saga, "b", &[Cue::Gated(0)]), &world).await;
    until("b is called", async || world.forward_calls(saga, "b") == 1).await;

    // A second replica starts while the first is alive and in the middle of b.
    let second = scripted::replica(&world, &store.pool, slow_policy(), "b", LONG_LEASE).await;
    assert_eq!(
        second.recover().await.unwrap(),
        0,
        "the second replica resumed a saga the first one drives"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        world.forward_calls(saga, "b"),
        1,
        "b was called by both replicas"
    );

    world.open_gate(0);
    assert_eq!(
        scripted::terminal(&store.pool, saga).await,
        SagaStatus::Completed
    );
    scripted::assert_consistent(&world, saga, SagaStatus::Completed);
    assert_eq!(owner_and_epoch(&store.pool, saga).await, ("a".into(), 1));
}

/// A replica whose lease ran out (it was paused, say) loses its saga to
/// another; when it wakes, its late write is refused and it stops driving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_past_its_lease_is_taken_over_and_fenced() {
    let store = store::fresh(Backend::Postgres).await;
    let world = Arc::new(World::default());
    let paused = scripted::replica(&world, &store.pool, slow_policy(), "a", LONG_LEASE).await;
    let saga = Uuid::new_v4();
    // The first call of b (by "a") waits for gate 0, the second (by the
    // replica that takes over) for gate 1.
    let cues = [Cue::Gated(0), Cue::Gated(1)];
    scripted::start_with(&paused, saga, |w| w.cue(saga, "b", &cues), &world).await;
    until("b is called", async || world.forward_calls(saga, "b") == 1).await;
    // As if "a" had not renewed for a whole lease: it is busy in b and
    // believes it still holds the saga.
    sqlx::query("UPDATE saga_replicas SET lease_until_ms = 0 WHERE replica_id = 'a'")
        .execute(&store.pool)
        .await
        .unwrap();

    let _taker = scripted::replica(&world, &store.pool, slow_policy(), "b", SHORT_LEASE).await;
    until("b takes the saga over", async || {
        owner_and_epoch(&store.pool, saga).await == ("b".into(), 2)
    })
    .await;
    until("the new owner calls b again", async || {
        world.forward_calls(saga, "b") == 2
    })
    .await;

    // The old owner's call returns first: its checkpoint must be refused,
    // and it must not go on to c.
    world.open_gate(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        world.forward_calls(saga, "c"),
        0,
        "the fenced replica went on to c"
    );
    let epochs = step_epochs(&store.pool, saga).await;
    assert_eq!(
        epochs,
        vec![("forward".to_owned(), "a".to_owned(), 1)],
        "the fenced replica wrote"
    );

    world.open_gate(1);
    assert_eq!(
        scripted::terminal(&store.pool, saga).await,
        SagaStatus::Completed
    );
    scripted::assert_consistent(&world, saga, SagaStatus::Completed);
    assert_eq!(world.forward_calls(saga, "c"), 1);
    let epochs = step_epochs(&store.pool, saga).await;
    let written: Vec<i64> = epochs.iter().map(|(_, _, e)| *e).collect();
    assert_eq!(
        written,
        vec![1, 2, 2],
        "a, then b and c by the new owner: {epochs:?}"
    );
    let event_epochs: Vec<i64> =
        sqlx::query_scalar("SELECT epoch FROM outbox WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(saga.to_string())
            .fetch_all(&store.pool)
            .await
            .unwrap();
    assert_eq!(event_epochs, vec![1, 2], "started by a, completed by b");
}

/// On shutdown a replica hands its sagas over: the others take them at once,
/// not after its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_shuts_down_hands_its_sagas_over_at_once() {
    let store = store::fresh(Backend::Postgres).await;
    let world = Arc::new(World::default());
    let leaving = scripted::replica(&world, &store.pool, slow_policy(), "a", LONG_LEASE).await;
    let staying = scripted::replica(&world, &store.pool, slow_policy(), "b", LONG_LEASE).await;
    let saga = Uuid::new_v4();
    scripted::start_with(
        &leaving,
        saga,
        |w| w.cue(saga, "b", &[Cue::Gated(0)]),
        &world,
    )
    .await;
    until("b is called", async || world.forward_calls(saga, "b") == 1).await;

    let since = std::time::Instant::now();
    leaving.shutdown(Duration::from_millis(50)).await;
    until("the staying replica takes the saga", async || {
        owner_and_epoch(&store.pool, saga).await.0 == "b"
    })
    .await;
    assert!(
        since.elapsed() < Duration::from_secs(5),
        "took {:?}",
        since.elapsed()
    );
    world.open_gate(0);
    assert_eq!(
        scripted::terminal(&store.pool, saga).await,
        SagaStatus::Completed
    );
    scripted::assert_consistent(&world, saga, SagaStatus::Completed);
    let replicas: Vec<String> = sqlx::query_scalar("SELECT replica_id FROM saga_replicas")
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(
        replicas,
        vec!["b".to_owned()],
        "the leaving replica ended its lease"
    );
    drop(staying);
}

/// A cancel accepted by one replica stops the retries of the driver on
/// another at once, not after its retry budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_one_replica_reaches_the_driver_on_another() {
    let store = store::fresh(Backend::Postgres).await;
    let world = Arc::new(World::default());
    let mut policy = scripted::policy();
    // Without the cancel, b would retry for about a minute.
    policy.max_attempts = 30;
    policy.initial_backoff = Duration::from_secs(2);
    policy.max_backoff = Duration::from_secs(2);
    let driving = scripted::replica(&world, &store.pool, policy.clone(), "a", LONG_LEASE).await;
    let other = scripted::replica(&world, &store.pool, policy, "b", LONG_LEASE).await;
    let saga = Uuid::new_v4();
    scripted::start_with(
        &driving,
        saga,
        |w| w.cue(saga, "b", &[Cue::Fail; 30]),
        &world,
    )
    .await;
    until("b fails once", async || world.forward_calls(saga, "b") == 1).await;

    let mut watch = other.watch(saga);
    assert_eq!(other.cancel(saga).await.unwrap(), CancelOutcome::Accepted);
    let since = std::time::Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(status) = watch.changed().await
                && status.is_terminal()
            {
                return status;
            }
        }
    })
    .await
    .expect("the watcher on the other replica hears the saga end");
    assert_eq!(status, SagaStatus::Cancelled);
    assert!(
        since.elapsed() < Duration::from_millis(1_500),
        "the cancel took {:?} to stop the retries",
        since.elapsed()
    );
    scripted::assert_consistent(&world, saga, SagaStatus::Cancelled);
    assert_eq!(owner_and_epoch(&store.pool, saga).await, ("a".into(), 1));
}

/// A log writer on a new PostgreSQL database that tells the other replicas
/// of its commits, signed `sender`, and a listener that hears them.
struct Telling {
    store: store::TestStore,
    listener: sqlx::postgres::PgListener,
    sender: Uuid,
    writer: saga_engine::log::LogWriter,
}

async fn telling() -> Telling {
    let store = store::fresh(Backend::Postgres).await;
    let url = store.pool.connect_options().database_url.to_string();
    let mut listener = sqlx::postgres::PgListener::connect(&url).await.unwrap();
    listener.listen("saga_changes").await.unwrap();
    let sender = Uuid::new_v4();
    let writer =
        saga_engine::log::LogWriter::spawn(store.pool.clone(), Some(sender), Default::default())
            .unwrap();
    Telling {
        store,
        listener,
        sender,
        writer,
    }
}

/// A checkpoint committed alone (one statement, no transaction around it)
/// writes what the batch path writes, and tells the other replicas, in its
/// commit, what it set: `RUNNING` for a step's result, `COMPLETED` for a
/// granted completion, `-` for one refused because a cancel came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_committed_alone_tells_the_other_replicas_what_it_set() {
    use saga_engine::{
        Phase, StepStatus,
        log::{self, Checkpoint, SagaState, StepRecord},
    };

    let Telling {
        store,
        mut listener,
        sender,
        writer,
    } = telling().await;
    let sagas = [
        store::new_saga(&store.pool).await,
        store::new_saga(&store.pool).await,
    ];
    let mut heard = async || {
        let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notice within 10 s")
            .unwrap();
        notification.payload().to_owned()
    };
    for saga in &sagas {
        let mut done = StepRecord::started(Phase::Forward, 0, "a", 1_000);
        done.status = StepStatus::Succeeded;
        done.attempts = 1;
        done.output = "{\"a\":1}".into();
        done.finished_at_ms = Some(1_010);
        let applied = writer
            .commit(Checkpoint::new(
                *saga,
                log::FIRST_EPOCH,
                vec![done, StepRecord::started(Phase::Forward, 1, "b", 1_020)],
                Some(SagaState {
                    status: SagaStatus::Running,
                    next_step: 1,
                    failure_reason: String::new(),
                }),
                vec![],
            ))
            .await
            .unwrap();
        assert!(applied.closed.is_none() && !applied.fenced && !applied.completed);
        assert_eq!(heard().await, format!("{sender}\n{saga} RUNNING"));
    }
    let steps: Vec<(String, i64, String, String, i64, i64)> = sqlx::query_as(
        "SELECT name, step_index, status, output, started_at_ms, epoch FROM saga_steps \
         WHERE saga_id = $1 ORDER BY step_index",
    )
    .bind(sagas[0].to_string())
    .fetch_all(&store.pool)
    .await
    .unwrap();
    assert_eq!(
        steps,
        vec![
            // As written: a step has no record before it ends.
            (
                "a".into(),
                0,
                "SUCCEEDED".into(),
                "{\"a\":1}".into(),
                1_000,
                1
            ),
            ("b".into(), 1, "RUNNING".into(), String::new(), 1_020, 1),
        ]
    );
    // The second saga was cancelled meanwhile: its completion is refused.
    sqlx::query("UPDATE sagas SET cancel_requested = 1 WHERE saga_id = $1")
        .bind(sagas[1].to_string())
        .execute(&store.pool)
        .await
        .unwrap();
    for (saga, told) in [(sagas[0], "COMPLETED"), (sagas[1], "-")] {
        let mut done = StepRecord::started(Phase::Forward, 1, "b", 1_020);
        done.status = StepStatus::Succeeded;
        done.finished_at_ms = Some(1_030);
        let completion = Checkpoint {
            complete: true,
            ..Checkpoint::new(saga, log::FIRST_EPOCH, vec![done], None, vec![])
        };
        let applied = writer.commit(completion).await.unwrap();
        assert_eq!(applied.completed, told == "COMPLETED");
        assert_eq!(applied.cancel_requested, told == "-");
        assert_eq!(heard().await, format!("{sender}\n{saga} {told}"));
    }
    // A checkpoint of a saga that is over writes nothing and tells nothing.
    let late = Checkpoint::new(sagas[0], log::FIRST_EPOCH, vec![], None, vec![]);
    let applied = writer.commit(late).await.unwrap();
    assert_eq!(applied.closed, Some(SagaStatus::Completed));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "no notice for a checkpoint that wrote nothing"
    );
}

/// A batch of checkpoints commits as one statement, its notices in it: each
/// saga it moved is told once, with what the checkpoint set (`RUNNING`,
/// `COMPLETED` for a completion that took, `-` for one refused because a
/// cancel came first), in payloads of at most 120 lines; a saga it could
/// not move (over already, or held at another epoch) is not told; the
/// events are written and numbered. The batch is made by holding the
/// writer on a saga's row (locked by another transaction) while 130 more
/// checkpoints queue up behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_checkpoints_tells_each_saga_it_moved_once() {
    use std::collections::BTreeMap;

    use saga_engine::{
        Phase, StepStatus,
        events::NewEvent,
        log::{self, Checkpoint, SagaState, StepRecord},
    };

    let Telling {
        store,
        mut listener,
        sender,
        writer,
    } = telling().await;
    let blocker = store::new_saga(&store.pool).await;
    let moving = store::new_sagas(&store.pool, 130).await;
    let [cancelled, over, completing, fenced] = [
        store::new_saga(&store.pool).await,
        store::new_saga(&store.pool).await,
        store::new_saga(&store.pool).await,
        store::new_saga(&store.pool).await,
    ];
    for (saga, set) in [
        (cancelled, "cancel_requested = 1"),
        (over, "status = 'COMPLETED'"),
        (fenced, "epoch = epoch + 1"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE sagas SET {set} WHERE saga_id = $1"
        )))
        .bind(saga.to_string())
        .execute(&store.pool)
        .await
        .unwrap();
    }
    let step_done = |saga: Uuid, events: Vec<NewEvent>| {
        let mut done = StepRecord::started(Phase::Forward, 0, "a", 1_000);
        done.status = StepStatus::Succeeded;
        done.attempts = 1;
        done.finished_at_ms = Some(1_010);
        Checkpoint::new(
            saga,
            log::FIRST_EPOCH,
            vec![done, StepRecord::started(Phase::Forward, 1, "b", 1_020)],
            Some(SagaState {
                status: SagaStatus::Running,
                next_step: 1,
                failure_reason: String::new(),
            }),
            events,
        )
    };
    let event = |saga: Uuid| NewEvent {
        aggregate_id: saga,
        key: "a-done".into(),
        event_type: "test.a-done".into(),
        data: serde_json::Map::new(),
        traceparent: String::new(),
    };

    let mut lock = store.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sagas WHERE saga_id = $1 FOR UPDATE")
        .bind(blocker.to_string())
        .execute(&mut *lock)
        .await
        .unwrap();
    let held = tokio::spawn({
        let writer = writer.clone();
        let checkpoint = step_done(blocker, vec![]);
        async move { writer.commit(checkpoint).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut queued = vec![];
    for &saga in &moving {
        let writer = writer.clone();
        let checkpoint = step_done(saga, vec![event(saga)]);
        queued.push(tokio::spawn(async move { writer.commit(checkpoint).await }));
    }
    let completion = |saga| Checkpoint {
        complete: true,
        ..Checkpoint::new(saga, log::FIRST_EPOCH, vec![], None, vec![])
    };
    for checkpoint in [
        completion(cancelled),
        step_done(over, vec![]),
        completion(completing),
        step_done(fenced, vec![]),
    ] {
        let writer = writer.clone();
        queued.push(tokio::spawn(async move { writer.commit(checkpoint).await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    lock.rollback().await.unwrap();
    held.await.unwrap().unwrap();
    let applied: Vec<_> = futures::future::join_all(queued)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap())
        .collect();
    assert!(applied[130].cancel_requested, "the cancelled saga");
    assert!(!applied[130].completed, "the cancelled saga's completion");
    assert_eq!(
        applied[131].closed,
        Some(SagaStatus::Completed),
        "the saga that was over"
    );
    assert!(applied[132].completed, "the completion that took");
    assert!(applied[133].fenced, "the saga held at another epoch");

    // Every line told, by payload: the blocker's alone, then the batch's.
    let mut told: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
    let mut largest = 0;
    while told.len() < 133 {
        let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notice within 10 s")
            .unwrap();
        let mut lines = notification.payload().lines();
        assert_eq!(lines.next(), Some(sender.to_string().as_str()));
        let lines: Vec<&str> = lines.collect();
        largest = largest.max(lines.len());
        for line in lines {
            let (saga, status) = line.split_once(' ').unwrap();
            told.entry(saga.parse().unwrap())
                .or_default()
                .push(status.to_owned());
        }
    }
    assert_eq!(largest, 120, "the batch's notices, 120 lines a payload");
    assert_eq!(told.remove(&cancelled), Some(vec!["-".to_owned()]));
    assert_eq!(told.remove(&completing), Some(vec!["COMPLETED".to_owned()]));
    for saga in moving.iter().chain([&blocker]) {
        assert_eq!(
            told.remove(saga),
            Some(vec!["RUNNING".to_owned()]),
            "{saga}"
        );
    }
    assert!(told.is_empty(), "told of sagas it did not move: {told:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.recv())
            .await
            .is_err(),
        "no notice for the sagas it did not move"
    );
    let events: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, sequence FROM outbox ORDER BY aggregate_id")
            .fetch_all(&store.pool)
            .await
            .unwrap();
    let mut expected: Vec<(String, i64)> = moving.iter().map(|s| (s.to_string(), 1)).collect();
    expected.sort();
    assert_eq!(events, expected);
}
