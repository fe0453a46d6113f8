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
);

async fn new_saga(pool: &AnyPool) -> Uuid {
    let saga = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    log::insert_saga(
        &mut tx,
        &log::NewSaga {
            saga_id: saga,
            kind: "scripted",
            data_json: "{}".into(),
            trace_context: String::new(),
            first_step: "a",
            starts_at_pivot: false,
            owner: "local".into(),
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    saga
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
    let saga = new_saga(&store.pool).await;
    let writer = LogWriter::spawn(store.pool.clone(), None).unwrap();
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
    let saga = new_saga(&store.pool).await;
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
