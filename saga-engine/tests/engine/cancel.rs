//! Cancellation: an accepted cancel always ends the saga CANCELLED with no
//! effect left; a cancel and the pivot race, and exactly one wins.

use std::{sync::Arc, time::Duration};

use saga_engine::{CancelOutcome, RetryPolicy, SagaStatus};
use uuid::Uuid;

use crate::{
    scripted::{self, Cue, World, assert_consistent},
    store::{self, Backend},
};

on_both_stores!(
    a_cancel_stops_the_retries_of_a_step_and_undoes_it,
    a_cancel_accepted_during_a_step_that_is_then_refused_ends_cancelled,
    a_cancel_and_the_pivot_race_and_exactly_one_wins,
    a_cancel_dropped_at_any_await_leaves_no_transaction_open,
    a_cancel_whose_caller_left_after_one_poll_still_stops_the_saga_at_once,
);

/// Waits until step `step` of `saga` has been called `calls` times.
async fn until_called(world: &World, saga: Uuid, step: &'static str, calls: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while world.forward_calls(saga, step) < calls {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{step} never called"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn a_cancel_stops_the_retries_of_a_step_and_undoes_it(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let policy = RetryPolicy {
        max_attempts: 1_000,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(20),
        ..scripted::policy()
    };
    let engine = scripted::engine(&world, &store.pool, policy);
    let saga = Uuid::new_v4();
    // b does its work, then loses every reply.
    scripted::start_with(
        &engine,
        saga,
        |w| w.cue(saga, "b", &[Cue::LoseReply; 1_000]),
        &world,
    )
    .await;
    until_called(&world, saga, "b", 2).await;
    assert_eq!(engine.cancel(saga).await.unwrap(), CancelOutcome::Accepted);
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Cancelled);
    assert!(
        world.forward_calls(saga, "b") < 10,
        "the retries stopped at the cancel"
    );
    assert_eq!(world.undone(saga), vec!["b", "a"]);
    assert_consistent(&world, saga, status);
}

/// A cancel whose caller is dropped once the log has it (a client that
/// left, a deadline that passed) must still wake the saga's driver: the
/// saga waits a minute before its next try, and must not wait it out before
/// it sees the cancel. (What follows the cancel's commit ran in the
/// caller's future before the eighteenth session; then the driver saw the
/// cancel only after its wait.)
async fn a_cancel_whose_caller_left_after_one_poll_still_stops_the_saga_at_once(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let policy = RetryPolicy {
        max_attempts: 1_000,
        initial_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(60),
        ..scripted::policy()
    };
    let engine = scripted::engine(&world, &store.pool, policy);
    let saga = Uuid::new_v4();
    // b does its work, then loses its reply: its next try is a minute away.
    scripted::start_with(
        &engine,
        saga,
        |w| w.cue(saga, "b", &[Cue::LoseReply; 2]),
        &world,
    )
    .await;
    until_called(&world, saga, "b", 1).await;
    let mut call = Box::pin(engine.cancel(saga));
    assert!(
        futures::poll!(call.as_mut()).is_pending(),
        "the cancel ended at its first poll: the test shows nothing"
    );
    drop(call);

    scripted::until_status(
        &store.pool,
        saga,
        SagaStatus::Cancelled,
        "a cancel whose caller left (its driver waits out its minute, or the cancel was never committed)",
    )
    .await;
    assert_eq!(world.forward_calls(saga, "b"), 1, "b was not tried again");
    assert_eq!(world.undone(saga), vec!["b", "a"]);
    // Asked again, it changes nothing.
    assert_eq!(
        engine.cancel(saga).await.unwrap(),
        CancelOutcome::AlreadyRequested
    );
}

async fn a_cancel_accepted_during_a_step_that_is_then_refused_ends_cancelled(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    for refused in ["a", "b"] {
        let saga = Uuid::new_v4();
        scripted::start_with(
            &engine,
            saga,
            |w| w.cue(saga, refused, &[Cue::SlowRefuse]),
            &world,
        )
        .await;
        until_called(&world, saga, refused, 1).await;
        assert_eq!(engine.cancel(saga).await.unwrap(), CancelOutcome::Accepted);
        let status = scripted::terminal(&store.pool, saga).await;
        assert_eq!(
            status,
            SagaStatus::Cancelled,
            "{refused} was refused after the cancel"
        );
        assert_consistent(&world, saga, status);
    }
}

async fn a_cancel_and_the_pivot_race_and_exactly_one_wins(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let mut outcomes = (0, 0);
    for round in 0..30u64 {
        // Step b takes 3 ms, so the moments below fall before the pivot and
        // after it, however fast the store commits.
        let saga = Uuid::new_v4();
        scripted::start_with(&engine, saga, |w| w.cue(saga, "b", &[Cue::Slow]), &world).await;
        // Cancel at a different moment of the saga's life each round.
        tokio::time::sleep(Duration::from_micros(round * 150)).await;
        let outcome = engine.cancel(saga).await.unwrap();
        let status = scripted::terminal(&store.pool, saga).await;
        match outcome {
            CancelOutcome::Accepted => {
                outcomes.0 += 1;
                assert_eq!(status, SagaStatus::Cancelled, "an accepted cancel wins");
                assert_eq!(
                    world.forward_calls(saga, "c"),
                    0,
                    "the pivot never runs after an accepted cancel"
                );
            }
            CancelOutcome::PastPivot | CancelOutcome::NotRunning(SagaStatus::Completed) => {
                outcomes.1 += 1;
                assert_eq!(
                    status,
                    SagaStatus::Completed,
                    "a refused cancel changes nothing"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_consistent(&world, saga, status);
    }
    assert!(outcomes.0 > 0, "some cancels won: {outcomes:?}");
}

/// A cancel runs in its caller's task (a CancelOrder call), which tonic drops
/// when the client leaves, wherever it is: in the middle of the cancel's
/// `BEGIN` too. No pooled connection may be left inside a transaction then.
/// The sagas are finished first, so that nothing else uses the pool and
/// absorbs a stranded transaction into its own.
async fn a_cancel_dropped_at_any_await_leaves_no_transaction_open(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    for polls in 0..20 {
        let saga = scripted::start(&engine).await;
        scripted::terminal(&store.pool, saga).await;
        let mut cancel = Box::pin(engine.cancel(saga));
        for _ in 0..polls {
            if futures::poll!(cancel.as_mut()).is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        drop(cancel);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            store.stranded_transactions().await,
            0,
            "a cancel dropped after {polls} polls left a connection inside a transaction"
        );
    }
}
