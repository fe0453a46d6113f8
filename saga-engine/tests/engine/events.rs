//! Events are deduplicable: a checkpoint applied twice writes its event once,
//! with the same ID, and a saga's sequence survives pruning of the outbox.

use saga_engine::{
    SagaStatus,
    events::{self, NewEvent},
    log::{self, Checkpoint, LogWriter, SagaState},
};
use sqlx::AnyPool;
use uuid::Uuid;

use crate::store::{self, Backend};

on_both_stores!(
    a_checkpoint_applied_twice_writes_its_event_once,
    a_sagas_sequence_goes_on_after_its_events_are_pruned,
    sagas_committed_together_each_number_their_own_events_in_order,
    a_completion_refused_for_a_cancel_writes_no_event_and_takes_no_number,
    a_saga_reopened_by_an_operator_announces_each_end_it_reaches,
);

/// A checkpoint that only announces the events of `keys` (and completes
/// the saga if `complete`).
fn announcing(saga: Uuid, keys: &[&str], complete: bool) -> Checkpoint {
    Checkpoint {
        saga_id: saga,
        epoch: log::FIRST_EPOCH,
        steps: vec![],
        state: None,
        enter_pivot: false,
        complete,
        events: keys.iter().map(|key| event(saga, key)).collect(),
    }
}

fn event(saga: Uuid, key: &str) -> NewEvent {
    NewEvent {
        aggregate_id: saga,
        key: key.into(),
        event_type: format!("test.{key}"),
        data: serde_json::Map::new(),
        traceparent: String::new(),
    }
}

async fn outbox(pool: &AnyPool, saga: Uuid) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT sequence, event_id FROM outbox WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(saga.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn a_checkpoint_applied_twice_writes_its_event_once(backend: Backend) {
    let store = store::fresh(backend).await;
    let saga = store::new_saga(&store.pool).await;
    let writer = LogWriter::spawn(store.pool.clone(), None, Default::default()).unwrap();
    let finished = Checkpoint {
        saga_id: saga,
        epoch: log::FIRST_EPOCH,
        steps: vec![],
        state: Some(SagaState {
            status: SagaStatus::Failed,
            next_step: -1,
            failure_reason: "a failed".into(),
        }),
        enter_pivot: false,
        complete: false,
        events: vec![event(saga, "finished")],
    };
    // The second commit is what the driver sends after a lost reply to the first.
    writer.commit(finished.clone()).await.unwrap();
    writer.commit(finished.clone()).await.unwrap();
    let rows = outbox(&store.pool, saga).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, 1);
    assert_eq!(rows[0].1, finished.events[0].event_id().to_string());
}

async fn a_sagas_sequence_goes_on_after_its_events_are_pruned(backend: Backend) {
    let store = store::fresh(backend).await;
    let saga = store::new_saga(&store.pool).await;
    let mut conn = store.pool.acquire().await.unwrap();
    assert!(
        events::insert(&mut conn, &event(saga, "started"))
            .await
            .unwrap()
    );
    assert!(
        events::insert(&mut conn, &event(saga, "stuck"))
            .await
            .unwrap()
    );
    // What the relay's pruning does to sent events past their retention.
    sqlx::query("DELETE FROM outbox WHERE aggregate_id = $1")
        .bind(saga.to_string())
        .execute(&mut *conn)
        .await
        .unwrap();
    assert!(
        events::insert(&mut conn, &event(saga, "finished"))
            .await
            .unwrap()
    );
    // Writing an event again is a no-op.
    assert!(
        !events::insert(&mut conn, &event(saga, "finished"))
            .await
            .unwrap()
    );
    drop(conn);
    let rows = outbox(&store.pool, saga).await;
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![3]);
}

/// Many sagas' checkpoints committed at once share batches, whose events
/// are written together (on PostgreSQL, in one statement): each saga still
/// numbers its own events 1, 2, 3 in the order they were announced, with
/// the number in the published payload too, and a checkpoint sent again
/// (here in the same batch as the next one) adds nothing.
async fn sagas_committed_together_each_number_their_own_events_in_order(backend: Backend) {
    const SAGAS: usize = 40;
    let store = store::fresh(backend).await;
    let sagas = store::new_sagas(&store.pool, SAGAS).await;
    let writer = LogWriter::spawn(store.pool.clone(), None, Default::default()).unwrap();
    let checkpoint = |saga: Uuid, keys: &[&str]| announcing(saga, keys, false);
    let first: Vec<Checkpoint> = sagas
        .iter()
        .map(|s| checkpoint(*s, &["one", "two"]))
        .collect();
    commit_all(&writer, &first).await;
    let second: Vec<Checkpoint> = sagas
        .iter()
        .flat_map(|s| [checkpoint(*s, &["three"]), checkpoint(*s, &["one", "two"])])
        .collect();
    commit_all(&writer, &second).await;
    // Not one batch failed (the writer would have retried its writes one by
    // one, which would hide a fault of the batch's own statements).
    assert_eq!(writer.split_batches(), 0);
    for saga in sagas {
        let rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "SELECT sequence, event_id, payload, epoch FROM outbox WHERE aggregate_id = $1 ORDER BY sequence",
        )
        .bind(saga.to_string())
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let ids: Vec<String> = ["one", "two", "three"]
            .iter()
            .map(|key| event(saga, key).event_id().to_string())
            .collect();
        assert_eq!(
            rows.iter().map(|r| (r.0, r.1.clone())).collect::<Vec<_>>(),
            vec![
                (1, ids[0].clone()),
                (2, ids[1].clone()),
                (3, ids[2].clone())
            ],
            "saga {saga}"
        );
        for (sequence, event_id, payload, epoch) in rows {
            let body: serde_json::Value = serde_json::from_str(&payload).unwrap();
            assert_eq!(body["sequence"], sequence, "saga {saga}: {payload}");
            assert_eq!(body["event_id"], event_id.as_str());
            assert_eq!(epoch, log::FIRST_EPOCH);
        }
    }
}

/// A batch of completions, some of sagas a client cancelled meanwhile: the
/// refused completions write no event and take no number (on PostgreSQL the
/// counter is bumped in the same statement that moves the row), so each
/// cancelled saga's next event is its second, and the others' completion
/// events are theirs.
async fn a_completion_refused_for_a_cancel_writes_no_event_and_takes_no_number(backend: Backend) {
    const SAGAS: usize = 40;
    let store = store::fresh(backend).await;
    let sagas = store::new_sagas(&store.pool, SAGAS).await;
    let writer = LogWriter::spawn(store.pool.clone(), None, Default::default()).unwrap();
    let checkpoint = |saga: Uuid, key: &str, complete: bool| announcing(saga, &[key], complete);
    let started: Vec<Checkpoint> = sagas
        .iter()
        .map(|s| checkpoint(*s, "started", false))
        .collect();
    commit_all(&writer, &started).await;
    let cancelled: Vec<Uuid> = sagas.iter().copied().step_by(2).collect();
    for saga in &cancelled {
        // What an accepted CancelOrder leaves on the row.
        sqlx::query("UPDATE sagas SET cancel_requested = 1 WHERE saga_id = $1")
            .bind(saga.to_string())
            .execute(&store.pool)
            .await
            .unwrap();
    }
    let completions: Vec<Checkpoint> = sagas
        .iter()
        .map(|s| checkpoint(*s, "completed", true))
        .collect();
    let applied =
        futures::future::join_all(completions.iter().map(|c| writer.commit(c.clone()))).await;
    for (saga, applied) in sagas.iter().zip(applied) {
        let applied = applied.unwrap();
        assert_eq!(applied.completed, !cancelled.contains(saga), "saga {saga}");
        assert_eq!(
            applied.cancel_requested,
            cancelled.contains(saga),
            "saga {saga}"
        );
    }
    let compensations: Vec<Checkpoint> = cancelled
        .iter()
        .map(|s| checkpoint(*s, "cancelled", false))
        .collect();
    commit_all(&writer, &compensations).await;
    assert_eq!(writer.split_batches(), 0);
    for saga in sagas {
        let last = if cancelled.contains(&saga) {
            "cancelled"
        } else {
            "completed"
        };
        let rows = outbox(&store.pool, saga).await;
        let ids: Vec<String> = ["started", last]
            .iter()
            .map(|key| event(saga, key).event_id().to_string())
            .collect();
        assert_eq!(
            rows,
            vec![(1, ids[0].clone()), (2, ids[1].clone())],
            "saga {saga} ({last})"
        );
        let (counter, status): (i64, String) =
            sqlx::query_as("SELECT events_sequence, status FROM sagas WHERE saga_id = $1")
                .bind(saga.to_string())
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(counter, 2, "saga {saga} ({last})");
        let expected = if cancelled.contains(&saga) {
            "RUNNING"
        } else {
            "COMPLETED"
        };
        assert_eq!(status, expected);
    }
}

/// Commits `checkpoints` at once, as concurrent sagas would; each must succeed.
async fn commit_all(writer: &LogWriter, checkpoints: &[Checkpoint]) {
    for written in
        futures::future::join_all(checkpoints.iter().map(|c| writer.commit(c.clone()))).await
    {
        written.unwrap();
    }
}

/// A saga that rests NEEDS_ATTENTION and is reopened by an operator
/// announces the end it reaches then, and again each time it comes to rest,
/// and a compensation stuck again: consumers hear every end and every
/// warning, each under an ID of its own.
async fn a_saga_reopened_by_an_operator_announces_each_end_it_reaches(backend: Backend) {
    use std::{sync::Arc, time::Duration};

    use crate::scripted::{self, World};
    use saga_engine::{Reopen, ReopenOutcome};

    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let policy = saga_engine::RetryPolicy {
        // Far apart: the stuck warning comes before the end even when one
        // commit takes long on a busy machine.
        compensation_stuck_after: Duration::from_millis(20),
        compensation_attention_after: Some(Duration::from_millis(1_000)),
        ..scripted::policy()
    };
    let engine = scripted::engine(&world, &store.pool, policy);
    let saga = Uuid::new_v4();
    scripted::rest_needing_attention(&engine, saga, &world, &store.pool).await;
    let mut expected = vec![
        "test.started",
        "test.compensation_stuck",
        "test.needs_attention",
    ];
    assert_eq!(event_types(&store.pool, saga).await, expected);

    // Retried while undoing b still fails: stuck again, it comes to rest again.
    let reopen = |request_id: &str| Reopen {
        saga_id: saga,
        request_id: request_id.into(),
        resolved_by_hand: None,
    };
    assert_eq!(
        engine.reopen(reopen("retry-1")).await.unwrap(),
        ReopenOutcome::Reopened
    );
    expected.extend(["test.compensation_stuck", "test.needs_attention"]);
    assert_eq!(
        until_events(&store.pool, saga, expected.len()).await,
        expected
    );

    // The cause fixed, retried again: b and a are undone.
    world.clear_compensation_cues(saga, "b");
    assert_eq!(
        engine.reopen(reopen("retry-2")).await.unwrap(),
        ReopenOutcome::Reopened
    );
    expected.push("test.compensated");
    assert_eq!(
        until_events(&store.pool, saga, expected.len()).await,
        expected
    );
    assert_eq!(
        scripted::terminal(&store.pool, saga).await,
        SagaStatus::Compensated
    );
    assert_eq!(world.undone(saga), vec!["b", "a"]);
}

/// The types of the saga's events in the outbox, in sequence.
async fn event_types(pool: &AnyPool, saga: Uuid) -> Vec<String> {
    sqlx::query_scalar("SELECT event_type FROM outbox WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(saga.to_string())
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The saga's event types once the outbox holds `count` of them (or after 30 s).
async fn until_events(pool: &AnyPool, saga: Uuid, count: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let seen = event_types(pool, saga).await;
        if seen.len() >= count || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
