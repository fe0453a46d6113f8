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

on_both_stores!(
    refused_sagas_leave_no_row_and_their_neighbours_run,
    sagas_admitted_together_by_their_callers_rows_each_keep_their_own,
);

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

/// Writes the caller's row of a key, refusing a key written before: on
/// PostgreSQL as rows of the statement that records the sagas
/// (`Admit::insert_rows_sql`), elsewhere one by one.
struct Keyed {
    key: &'static str,
    saga_id: Uuid,
}

const INSERT_KEY: &str =
    "INSERT INTO callers (key, saga_id) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";

fn admission(written: u64) -> Admission {
    match written {
        1 => Admission::Admit,
        _ => Admission::Refuse,
    }
}

impl Admit for Keyed {
    fn admit<'c>(
        &'c self,
        conn: &'c mut sqlx::AnyConnection,
        _: i64,
    ) -> BoxFuture<'c, Result<Admission, sqlx::Error>> {
        Box::pin(async move {
            let written = sqlx::query(INSERT_KEY)
                .bind(self.key)
                .bind(self.saga_id.to_string())
                .execute(conn)
                .await?
                .rows_affected();
            Ok(admission(written))
        })
    }

    fn admit_sqlite(&self, conn: &rusqlite::Connection, _: i64) -> rusqlite::Result<Admission> {
        let written = conn.execute(INSERT_KEY, [self.key, &self.saga_id.to_string()])?;
        Ok(admission(written as u64))
    }

    fn insert_rows_sql(&self) -> Option<&'static str> {
        Some(
            "INSERT INTO callers (key, saga_id) \
             SELECT r.key, r.saga_id FROM ROWS FROM (jsonb_to_recordset($1::jsonb) AS (key text, saga_id text)) \
                 WITH ORDINALITY AS r(key, saga_id, n) ORDER BY r.n \
             ON CONFLICT (key) DO NOTHING RETURNING saga_id",
        )
    }

    fn insert_row(&self, _: i64) -> String {
        serde_json::json!({ "key": self.key, "saga_id": self.saga_id.to_string() }).to_string()
    }
}

/// Sagas started at one moment share the log's batches; on PostgreSQL their
/// callers' rows go in one statement with the sagas' own. Of two with one
/// key one is admitted, a key written before refuses its saga, and each
/// admitted saga has its own row, its own first event, and runs to its end.
async fn sagas_admitted_together_by_their_callers_rows_each_keep_their_own(backend: Backend) {
    let store = store::fresh(backend).await;
    sqlx::query("CREATE TABLE callers (key TEXT PRIMARY KEY, saga_id TEXT NOT NULL)")
        .execute(&store.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO callers (key, saga_id) VALUES ('taken', 'someone else')")
        .execute(&store.pool)
        .await
        .unwrap();
    let world = Arc::new(World::default());
    let engine = Arc::new(scripted::engine(&world, &store.pool, scripted::policy()));
    let keys = ["k0", "k1", "k0", "taken", "k2", "k1", "k3", "k4"];
    let ids: Vec<Uuid> = keys.iter().map(|_| Uuid::now_v7()).collect();
    let started = futures::future::join_all(keys.iter().zip(&ids).map(|(key, id)| {
        let engine = engine.clone();
        async move { start(&engine, *id, Keyed { key, saga_id: *id }).await }
    }))
    .await;
    let mut admitted: Vec<String> = vec![];
    for (key, (id, started)) in keys.iter().zip(ids.iter().zip(started)) {
        if started.unwrap() == Started::Started {
            admitted.push(id.to_string());
            let owner: String = sqlx::query_scalar("SELECT saga_id FROM callers WHERE key = $1")
                .bind(*key)
                .fetch_one(&store.pool)
                .await
                .unwrap();
            assert_eq!(owner, id.to_string(), "the row of {key}");
        }
    }
    admitted.sort();
    assert_eq!(admitted.len(), 5, "one saga per fresh key: {admitted:?}");
    assert_eq!(
        sagas(&store.pool).await,
        admitted,
        "only the admitted sagas' rows"
    );
    let first_events: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM outbox WHERE sequence = 1 AND event_type = 'test.started' \
         ORDER BY aggregate_id",
    )
    .fetch_all(&store.pool)
    .await
    .unwrap();
    assert_eq!(
        first_events, admitted,
        "each admitted saga's first event, once"
    );
    for id in &admitted {
        assert_eq!(
            scripted::terminal(&store.pool, id.parse().unwrap()).await,
            SagaStatus::Completed
        );
    }
}
