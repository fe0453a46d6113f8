//! The outbox's indexes: a new event's entries land beside its saga's, not
//! on a random page of an index as large as the outbox (SQLite and
//! PostgreSQL), and the SQLite migration that rebuilt the table for it kept
//! every row.

use rusqlite::{Connection, params};
use uuid::Uuid;

/// The engine's statement for an event (`events::INSERT`), as SQL text.
const INSERT_EVENT: &str = "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
     VALUES (?1, ?2, ?3, 'order.created', '{}', '', 0, 1)";

/// A SQLite file migrated up to `version` (all of them with `None`).
async fn migrated(dir: &tempfile::TempDir, version: Option<i64>) -> std::path::PathBuf {
    sqlx::any::install_default_drivers();
    let path = dir.path().join("saga.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    match version {
        Some(version) => saga_engine::MIGRATIONS_SQLITE
            .run_to(version, &pool)
            .await
            .unwrap(),
        None => saga_engine::MIGRATIONS_SQLITE.run(&pool).await.unwrap(),
    }
    pool.close().await;
    path
}

/// Two events for `saga`, as a saga's order.created and its end.
fn write_events(conn: &Connection, saga: Uuid) {
    for (sequence, key) in [(1, "created"), (2, "completed")] {
        let event_id = Uuid::new_v5(&saga, key.as_bytes()).to_string();
        conn.execute(INSERT_EVENT, params![event_id, saga.to_string(), sequence])
            .unwrap();
    }
}

/// Pages a commit of 64 new sagas' events writes to the WAL, on an outbox
/// that holds the events of 10,000 earlier sagas.
#[tokio::test]
async fn a_batch_of_new_events_writes_a_few_pages_however_large_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let path = migrated(&dir, None).await;
    let mut conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    let tx = conn.transaction().unwrap();
    for _ in 0..10_000 {
        write_events(&tx, Uuid::now_v7());
    }
    tx.commit().unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();

    let tx = conn.transaction().unwrap();
    for _ in 0..64 {
        write_events(&tx, Uuid::now_v7());
    }
    tx.commit().unwrap();

    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .unwrap()
        .len();
    let frames = (wal - 32) / (page_size as u64 + 24);
    // Keyed by the event's ID (a hash), the 128 entries went to about a
    // hundred pages of that index alone: 138 pages in all. Led by the saga
    // (time-ordered), they share the last pages of each index: 29.
    assert!(
        frames <= 48,
        "128 new events wrote {frames} pages of the outbox's B-trees"
    );
}

/// Pages a commit of 64 new sagas' events changes on PostgreSQL, on an
/// outbox that holds the events of 10,000 earlier sagas: each page changed
/// first after a checkpoint goes whole into the WAL (a full-page image), so
/// the statement's count of them is the count of pages it touched.
/// (`CHECKPOINT` needs a superuser or the `pg_checkpoint` role.)
#[tokio::test]
async fn a_batch_of_new_events_changes_a_few_pages_however_large_the_outbox_postgres() {
    let store = crate::store::fresh(crate::store::Backend::Postgres).await;
    // The earlier sagas' IDs sort before any new UUIDv7; their events' IDs
    // are as random as a UUIDv5's.
    sqlx::query(
        "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
         SELECT gen_random_uuid()::text, '00000000-0000-7000-8000-' || lpad((i / 2)::text, 12, '0'), \
                1 + i % 2, 'order.created', '{}', '', 0, 1 \
         FROM generate_series(0, 19999) AS i",
    )
    .execute(&store.pool)
    .await
    .unwrap();
    sqlx::query("CHECKPOINT")
        .execute(&store.pool)
        .await
        .unwrap();

    let rows: Vec<String> = (0..64)
        .map(|_| Uuid::now_v7())
        .flat_map(|saga| {
            [(1, "created"), (2, "completed")].map(|(sequence, key)| {
                let event_id = Uuid::new_v5(&saga, key.as_bytes());
                format!("('{event_id}', '{saga}', {sequence}, 'order.created', '{{}}', '', 0, 1)")
            })
        })
        .collect();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, WAL, COSTS OFF, TIMING OFF) \
         INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
         VALUES {}",
        rows.join(", ")
    )))
    .fetch_all(&store.pool)
    .await
    .unwrap();
    // "WAL: records=… fpi=… bytes=…"; a count of 0 is left out.
    let full_pages: u64 = plan
        .iter()
        .flat_map(|line| line.split_whitespace())
        .find_map(|word| word.strip_prefix("fpi="))
        .map_or(0, |n| n.parse().unwrap());
    // Keyed by the event's ID, 97 pages; led by the saga, 8. None at all
    // would mean the count was not read (or full_page_writes is off): the
    // first change to the table's last page after a checkpoint writes one.
    assert!(
        (1..=24).contains(&full_pages),
        "128 new events changed {full_pages} pages of the outbox's B-trees: {plan:#?}"
    );

    // An event is still written once under its saga.
    let again = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO outbox (event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, epoch) \
         VALUES {}",
        rows[0].replace(", 1, 'order.created'", ", 9, 'order.created'")
    )))
    .execute(&store.pool)
    .await;
    let refused = again.expect_err("the same event under the same saga");
    assert!(
        refused
            .to_string()
            .contains("outbox_aggregate_id_event_id_key"),
        "{refused}"
    );
}

#[tokio::test]
async fn the_outbox_rebuilt_by_its_migration_keeps_its_rows_and_never_gives_an_id_again() {
    let dir = tempfile::tempdir().unwrap();
    // The outbox as it was before the rebuild (migration 5).
    let path = migrated(&dir, Some(4)).await;
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    let before = {
        let conn = Connection::open(&path).unwrap();
        write_events(&conn, first);
        write_events(&conn, second);
        conn.execute(
            "UPDATE outbox SET sent_at_ms = 7, epoch = 3, payload = '{\"n\":1}', \
             traceparent = 'tp', created_at_ms = 5 WHERE id = 1",
            [],
        )
        .unwrap();
        // The last event was sent and pruned: its id must not come back.
        conn.execute("DELETE FROM outbox WHERE id = 4", []).unwrap();
        rows(&conn)
    };
    assert_eq!(before.len(), 3);

    migrated(&dir, None).await;
    let conn = Connection::open(&path).unwrap();
    assert_eq!(rows(&conn), before);
    write_events(&conn, Uuid::now_v7());
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM outbox ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, [1, 2, 3, 5, 6]);

    // An event is still written once: the same ID under the same saga is
    // refused, as is a second event at the same place in its saga.
    let again = Uuid::new_v5(&first, b"created").to_string();
    let duplicate = conn.execute(INSERT_EVENT, params![again, first.to_string(), 9]);
    assert!(duplicate.is_err(), "{duplicate:?}");
    let fresh = Uuid::new_v4().to_string();
    let same_place = conn.execute(INSERT_EVENT, params![fresh, first.to_string(), 1]);
    assert!(same_place.is_err(), "{same_place:?}");
    // And the relay's index on unsent events came back with the table.
    let unsent: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'outbox_unsent'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unsent, 1);
}

/// Every column of every row, by id.
fn rows(conn: &Connection) -> Vec<Vec<rusqlite::types::Value>> {
    let mut statement = conn
        .prepare(
            "SELECT id, event_id, aggregate_id, sequence, event_type, payload, traceparent, \
             created_at_ms, sent_at_ms, epoch FROM outbox ORDER BY id",
        )
        .unwrap();
    let columns = statement.column_count();
    statement
        .query_map([], |r| (0..columns).map(|i| r.get(i)).collect())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}
