//! The log writer's connection on PostgreSQL: kept from one commit to the
//! next (sqlx pings a connection each time it is taken from the pool and
//! given back, two round trips per commit), and replaced when the server
//! closed it meanwhile.

use saga_engine::{
    definition::Phase,
    events::NewEvent,
    log::{
        self, AttemptRecord, Checkpoint, LogWriter, SagaState, SagaStatus, StepRecord, StepStatus,
    },
};
use sqlx::any::AnyPoolOptions;
use uuid::Uuid;

use crate::store::{self, Backend};

/// Moves `saga` to step 1, its step 0 done at its second attempt: a
/// checkpoint that commits in a transaction of its own (`BEGIN` first), even
/// alone, because the attempts are written after the saga's row. (One
/// without attempts commits as one statement, with no `BEGIN`.)
fn step_done(saga: Uuid) -> Checkpoint {
    let attempt = |attempt, error: &str| AttemptRecord {
        attempt,
        started_at_ms: 1,
        finished_at_ms: 2,
        error: error.into(),
    };
    Checkpoint {
        saga_id: saga,
        epoch: log::FIRST_EPOCH,
        steps: vec![StepRecord {
            status: StepStatus::Succeeded,
            attempts: 2,
            finished_at_ms: Some(2),
            attempt_log: vec![attempt(1, "unavailable"), attempt(2, "")],
            ..StepRecord::started(Phase::Forward, 0, "first", 1)
        }],
        state: Some(SagaState {
            status: SagaStatus::Running,
            next_step: 1,
            failure_reason: String::new(),
        }),
        enter_pivot: false,
        complete: false,
        events: vec![NewEvent {
            aggregate_id: saga,
            key: "step-done".into(),
            event_type: "test.step-done".into(),
            data: serde_json::Map::new(),
            traceparent: String::new(),
        }],
    }
}

/// Every session of the database ended by the server (as a restart or a
/// failover would) between two commits: the writer's kept connection is
/// gone, and so are the pool's, which the services' pools hand out unpinged
/// within a second of their last use (as this one does: no ping at all).
/// The next commit fails at its `BEGIN`, before anything was written, so it
/// is made again, and succeeds at its first try, on a new connection. (A
/// write that is one statement alone is not made again: it may have
/// committed before the connection was lost. Its caller hears the error.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_the_server_closed_the_writers_connection_succeeds() {
    let store = store::fresh(Backend::Postgres).await;
    let sagas = store::new_sagas(&store.pool, 2).await;
    let url = store.pool.connect_options().database_url.to_string();
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .unwrap();
    // Connections in the pool besides the writer's.
    let held: Vec<_> = futures::future::join_all((0..3).map(|_| pool.acquire()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    drop(held);
    let writer = LogWriter::spawn(pool, None, Default::default()).unwrap();
    writer.commit(step_done(sagas[0])).await.unwrap();
    assert!(store.end_sessions().await >= 1, "no session was ended");
    writer
        .commit(step_done(sagas[1]))
        .await
        .expect("the commit after the server closed the connection failed");
    for saga in sagas {
        let next: i64 = sqlx::query_scalar("SELECT next_step FROM sagas WHERE saga_id = $1")
            .bind(saga.to_string())
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(next, 1, "saga {saga}");
    }
}
