//! Recovery at every cursor position: the log is left as a crash would leave
//! it (with the step at the cursor done or not behind the log's back), then a
//! new engine resumes it. Every saga must end as its state dictates, with no
//! effect doubled and none left behind.

use std::sync::Arc;

use saga_engine::{SagaStatus, log};
use sqlx::AnyPool;
use uuid::Uuid;

use crate::{
    scripted::{self, STEPS, World, assert_consistent},
    store::{self, Backend},
};

on_both_stores!(
    recovery_at_every_cursor_position_ends_every_saga_once,
    a_look_whose_caller_left_still_drives_an_open_saga_nobody_drives,
);

/// One position a crash can leave a saga in.
#[derive(Debug, Clone, Copy)]
struct Position {
    status: SagaStatus,
    next_step: i64,
    cancel_requested: bool,
    /// The step at the cursor took effect (forward) or was undone
    /// (compensation) before the crash, but its checkpoint was not written.
    cursor_step_done: bool,
}

fn positions() -> Vec<Position> {
    let mut all = vec![];
    for next_step in 0..=3 {
        for cursor_step_done in [false, true] {
            if next_step == 3 && cursor_step_done {
                continue;
            }
            for cancel_requested in [false, true] {
                // A cancel is refused once the pivot (c, step 2) has begun.
                if cancel_requested && next_step > 2 {
                    continue;
                }
                all.push(Position {
                    status: SagaStatus::Running,
                    next_step,
                    cancel_requested,
                    cursor_step_done,
                });
            }
        }
    }
    for next_step in -1..=2 {
        for cursor_step_done in [false, true] {
            if next_step < 0 && cursor_step_done {
                continue;
            }
            // Compensating after a cancel accepted while it ran, or not.
            for cancel_requested in [false, true] {
                all.push(Position {
                    status: SagaStatus::Compensating,
                    next_step,
                    cancel_requested,
                    cursor_step_done,
                });
            }
        }
    }
    all
}

/// Writes the saga's log and the services' ledger as a crash at `position` leaves them.
async fn leave_as_crashed(pool: &AnyPool, world: &World, position: Position) -> Uuid {
    let saga = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    log::insert_saga(
        &mut tx,
        &log::NewSaga {
            saga_id: saga,
            kind: "scripted",
            data_json: r#"{"label":"crashed"}"#.into(),
            trace_context: String::new(),
            starts_at_pivot: false,
            owner: "local".into(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    sqlx::query(
        "UPDATE sagas SET status = $1, next_step = $2, cancel_requested = $3, pivot_passed = $4 WHERE saga_id = $5",
    )
    .bind(position.status.as_str())
    .bind(position.next_step)
    .bind(i64::from(position.cancel_requested))
    .bind(i64::from(position.next_step >= 2 && !position.cancel_requested))
    .bind(saga.to_string())
    .execute(pool)
    .await
    .unwrap();
    let done = match position.status {
        // Running at step i: steps before i took effect; i too if it was done.
        SagaStatus::Running => position.next_step + i64::from(position.cursor_step_done),
        // Compensating at step j: steps up to j are in place, j not if it was undone.
        _ => position.next_step + 1 - i64::from(position.cursor_step_done),
    };
    for step in STEPS.iter().take(done.max(0) as usize) {
        world.apply_behind_the_log(saga, step);
    }
    saga
}

fn expected(position: Position) -> SagaStatus {
    match position.status {
        SagaStatus::Running if position.cancel_requested => SagaStatus::Cancelled,
        SagaStatus::Running => SagaStatus::Completed,
        // An accepted cancel ends it CANCELLED, whatever was left to undo
        // (the last undo commits with that end).
        _ if position.cancel_requested => SagaStatus::Cancelled,
        // Nothing was left to undo and no compensation record was found.
        _ if position.next_step < 0 => SagaStatus::Failed,
        _ => SagaStatus::Compensated,
    }
}

async fn recovery_at_every_cursor_position_ends_every_saga_once(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let mut sagas = vec![];
    for position in positions() {
        let saga = leave_as_crashed(&store.pool, &world, position).await;
        sagas.push((saga, position));
    }
    // The restart: a new engine resumes every open saga.
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    assert_eq!(engine.recover().await.unwrap(), sagas.len());
    for (saga, position) in sagas {
        let status = scripted::terminal(&store.pool, saga).await;
        assert_eq!(status, expected(position), "{position:?}");
        assert_consistent(&world, saga, status);
    }
}

/// A client's replay of a request whose saga nobody drives (its start was
/// lost) makes sure it is driven (`ensure_driven`). The replay's caller may
/// leave at once, its deadline passed: the look goes on without it. (Before,
/// it ran in the caller's future: dropped after its claim, it left the saga
/// as undriven as it found it until the next replay or start.)
async fn a_look_whose_caller_left_still_drives_an_open_saga_nobody_drives(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    // Not resumed at its start: the saga below is open, and nobody drives it.
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = leave_as_crashed(
        &store.pool,
        &world,
        Position {
            status: SagaStatus::Running,
            next_step: 0,
            cancel_requested: false,
            cursor_step_done: false,
        },
    )
    .await;
    let mut look = Box::pin(engine.ensure_driven(saga));
    assert!(
        futures::poll!(look.as_mut()).is_pending(),
        "the look ended at its first poll: the test shows nothing"
    );
    drop(look);

    scripted::until_status(
        &store.pool,
        saga,
        SagaStatus::Completed,
        "a look whose caller left",
    )
    .await;
    assert_consistent(&world, saga, SagaStatus::Completed);
}
