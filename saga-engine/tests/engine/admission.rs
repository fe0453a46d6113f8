//! New sagas that their caller's rows refuse, started together so that they
//! share the log's batches with sagas that are admitted: nothing of a
//! refused saga stays, and its neighbours run.

use std::sync::Arc;

use futures::future::BoxFuture;
use saga_engine::{Admission, Admit, Engine, SagaStatus, Started};
use sqlx::AnyPool;
use uuid::Uuid;

use crate::{
    scripted::{self, Script, World},
    store::{self, Backend},
};

on_both_stores!(refused_sagas_leave_no_row_and_their_neighbours_run);

/// Admits or refuses, as told, writing nothing.
struct Decide(Admission);

impl Admit for Decide {
    fn admit<'c>(
        &'c self,
        _: &'c mut sqlx::AnyConnection,
        _: i64,
    ) -> BoxFuture<'c, Result<Admission, sqlx::Error>> {
        let admission = self.0;
        Box::pin(async move { Ok(admission) })
    }

    fn admit_sqlite(&self, _: &rusqlite::Connection, _: i64) -> rusqlite::Result<Admission> {
        Ok(self.0)
    }
}

async fn start(engine: &Engine<Script>, id: Uuid, admit: impl Admit) -> Result<Started, String> {
    let script = Script {
        label: "test".into(),
    };
    engine
        .start(id, script, admit)
        .await
        .map_err(|e| e.to_string())
}

async fn sagas(pool: &AnyPool) -> Vec<String> {
    sqlx::query_scalar("SELECT saga_id FROM sagas ORDER BY saga_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn refused_sagas_leave_no_row_and_their_neighbours_run(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = Arc::new(scripted::engine(&world, &store.pool, scripted::policy()));
    let ids: Vec<Uuid> = (0..32).map(|_| Uuid::now_v7()).collect();
    let started = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let engine = engine.clone();
        let admission = match i % 2 {
            0 => Admission::Admit,
            _ => Admission::Refuse,
        };
        async move { start(&engine, *id, Decide(admission)).await }
    }))
    .await;
    for (i, started) in started.into_iter().enumerate() {
        let expected = match i % 2 {
            0 => Started::Started,
            _ => Started::Refused,
        };
        assert_eq!(started.unwrap(), expected, "saga {i}");
    }
    let mut admitted: Vec<String> = ids.iter().step_by(2).map(Uuid::to_string).collect();
    admitted.sort();
    assert_eq!(
        sagas(&store.pool).await,
        admitted,
        "only the admitted sagas' rows"
    );
    for id in ids.iter().step_by(2) {
        assert_eq!(
            scripted::terminal(&store.pool, *id).await,
            SagaStatus::Completed
        );
    }
}

/// On a SQLite file the caller's rows are written on the log's own
/// connection, in the batch's transaction: a refusal takes back what the
/// caller wrote before refusing, with the saga's row, and not what its
/// neighbour in the batch wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_takes_back_what_its_caller_wrote() {
    let store = store::fresh(Backend::Sqlite).await;
    sqlx::query("CREATE TABLE callers (saga_id TEXT NOT NULL)")
        .execute(&store.pool)
        .await
        .unwrap();
    let world = Arc::new(World::default());
    let engine = Arc::new(scripted::engine(&world, &store.pool, scripted::policy()));

    /// Writes its row, then refuses.
    struct WritesThenRefuses(Uuid);
    impl Admit for WritesThenRefuses {
        fn admit<'c>(
            &'c self,
            _: &'c mut sqlx::AnyConnection,
            _: i64,
        ) -> BoxFuture<'c, Result<Admission, sqlx::Error>> {
            unreachable!("a SQLite file's log admits on its own connection")
        }

        fn admit_sqlite(&self, conn: &rusqlite::Connection, _: i64) -> rusqlite::Result<Admission> {
            conn.execute("INSERT INTO callers VALUES ($1)", [self.0.to_string()])?;
            Ok(Admission::Refuse)
        }
    }

    let (bad, good) = (Uuid::now_v7(), Uuid::now_v7());
    let (refused, admitted) = tokio::join!(
        start(&engine, bad, WritesThenRefuses(bad)),
        start(&engine, good, Decide(Admission::Admit)),
    );
    assert_eq!(refused.unwrap(), Started::Refused);
    assert_eq!(admitted.unwrap(), Started::Started);
    assert_eq!(sagas(&store.pool).await, vec![good.to_string()]);
    let callers: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM callers")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(callers, 0, "what the refusing caller wrote is taken back");
    assert_eq!(
        scripted::terminal(&store.pool, good).await,
        SagaStatus::Completed
    );
}
