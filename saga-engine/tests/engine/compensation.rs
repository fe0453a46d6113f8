//! Compensation: a definite "no" undoes the steps before it, in reverse order;
//! an unknown outcome undoes the step itself; the retry budget is kept.

use std::sync::Arc;

use saga_engine::{Phase, SagaStatus, StepStatus};

use crate::{
    scripted::{self, Cue, World, assert_consistent},
    store::{self, Backend},
};

on_both_stores!(
    every_step_succeeds_and_the_saga_completes,
    a_refusal_compensates_the_steps_before_it_in_reverse_order,
    a_refusal_of_the_first_step_fails_with_nothing_to_undo,
    an_outcome_that_stays_unknown_compensates_the_step_itself,
    a_lost_reply_then_a_retry_completes_with_one_effect,
    a_hung_call_counts_as_unknown_and_the_budget_is_kept,
    a_compensation_that_fails_is_retried_until_it_succeeds,
    many_sagas_at_once_each_end_by_their_own_script,
    each_attempt_of_a_retried_step_is_kept_with_its_times_and_error,
    a_step_is_written_once_when_it_ends_and_the_running_one_is_shown_from_the_saga,
    a_saga_commits_once_per_step_result_and_its_last_undo_with_its_end,
    a_reopen_whose_caller_left_after_its_commit_is_driven_to_its_end,
    a_reopen_that_found_its_saga_claimed_by_a_look_that_then_left_is_still_driven,
    two_operators_resolving_one_saga_at_once_one_wins_and_the_other_changes_nothing,
    a_resolve_replayed_with_another_note_is_refused_and_the_same_one_replays,
);

async fn every_step_succeeds_and_the_saga_completes(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = scripted::start(&engine).await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Completed);
    assert_consistent(&world, saga, status);
}

/// The log writes a step when it ends, never when it starts: the saga's row
/// says which step runs, and the view shows that step RUNNING from it.
async fn a_step_is_written_once_when_it_ends_and_the_running_one_is_shown_from_the_saga(
    backend: Backend,
) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    scripted::start_with(
        &engine,
        saga,
        |w| w.cue(saga, "b", &[Cue::Gated(0)]),
        &world,
    )
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while world.forward_calls(saga, "b") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "b never called");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let records = || async {
        sqlx::query_as::<_, (String, i64, String)>(
            "SELECT name, step_index, status FROM saga_steps WHERE saga_id = $1 ORDER BY step_index",
        )
        .bind(saga.to_string())
        .fetch_all(&store.pool)
        .await
        .unwrap()
    };
    assert_eq!(
        records().await,
        vec![("a".to_owned(), 0, "SUCCEEDED".to_owned())],
        "b runs: only a, which ended, has a record"
    );
    let view = engine.view(saga).await.unwrap().expect("the saga's view");
    let shown: Vec<_> = view
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.index, s.status, s.started_at_ms))
        .collect();
    let a_ended = view.steps[0].finished_at_ms;
    assert!(view.steps[0].started_at_ms.is_some() && a_ended.is_some());
    assert_eq!(
        shown,
        vec![
            ("a", 0, StepStatus::Succeeded, view.steps[0].started_at_ms),
            ("b", 1, StepStatus::Running, a_ended),
        ],
        "the view shows b running since a ended"
    );

    world.open_gate(0);
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Completed);
    assert_eq!(
        records().await,
        scripted::STEPS
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), i as i64, "SUCCEEDED".to_owned()))
            .collect::<Vec<_>>()
    );
    let view = engine.view(saga).await.unwrap().expect("the saga's view");
    assert!(
        view.steps.iter().all(|s| s.status == StepStatus::Succeeded),
        "a completed saga shows no running step: {:?}",
        view.steps
    );
    assert_consistent(&world, saga, status);
}

/// Every checkpoint is a commit on a saga's path: a completed saga makes one
/// per step, its last with its end; a compensated one one per step it ran and
/// one per undo, its last undo with its end (no commit of its own for
/// "nothing left to undo").
async fn a_saga_commits_once_per_step_result_and_its_last_undo_with_its_end(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let metrics = saga_engine::metrics::EngineMetrics::default();
    let engine =
        scripted::engine_with_metrics(&world, &store.pool, scripted::policy(), metrics.clone());

    let completed = scripted::start(&engine).await;
    assert_eq!(
        scripted::terminal(&store.pool, completed).await,
        SagaStatus::Completed
    );
    assert_eq!(
        settled_count(&metrics, 3).await,
        3,
        "a, b, and c with the saga's end"
    );

    let compensated = uuid::Uuid::new_v4();
    scripted::start_with(
        &engine,
        compensated,
        |w| w.cue(compensated, "c", &[Cue::Refuse]),
        &world,
    )
    .await;
    let status = scripted::terminal(&store.pool, compensated).await;
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(
        settled_count(&metrics, 3 + 5).await - 3,
        5,
        "a, b, c refused, b undone, a undone with the saga's end"
    );
    assert_consistent(&world, compensated, status);

    // The end leaves nothing to undo, as the move to it did before.
    let (next_step,): (i64,) = sqlx::query_as("SELECT next_step FROM sagas WHERE saga_id = $1")
        .bind(compensated.to_string())
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(next_step, -1);
    let view = engine
        .view(compensated)
        .await
        .unwrap()
        .expect("the saga's view");
    let undone: Vec<_> = view
        .steps
        .iter()
        .filter(|s| s.phase == saga_engine::Phase::Compensation)
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        undone,
        vec![("b", StepStatus::Succeeded), ("a", StepStatus::Succeeded)]
    );
}

/// The checkpoints counted once `expected` are (or 10 s went by), and a
/// moment after: a driver counts its commit when the writer's reply reaches
/// it, which may be after the saga's end is visible in the log.
async fn settled_count(metrics: &saga_engine::metrics::EngineMetrics, expected: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while metrics.checkpoints() < expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    // Nothing may follow a saga's end: one more count would show here.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    metrics.checkpoints()
}

async fn a_refusal_compensates_the_steps_before_it_in_reverse_order(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    scripted::start_with(&engine, saga, |w| w.cue(saga, "c", &[Cue::Refuse]), &world).await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(world.undone(saga), vec!["b", "a"]);
    assert_eq!(
        world.forward_calls(saga, "c"),
        1,
        "a definite no is not retried"
    );
    assert_consistent(&world, saga, status);
}

async fn a_refusal_of_the_first_step_fails_with_nothing_to_undo(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    scripted::start_with(&engine, saga, |w| w.cue(saga, "a", &[Cue::Refuse]), &world).await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Failed);
    assert!(world.undone(saga).is_empty());
    assert_consistent(&world, saga, status);
}

async fn an_outcome_that_stays_unknown_compensates_the_step_itself(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    // The work is done on the first attempt, but no reply ever arrives.
    scripted::start_with(
        &engine,
        saga,
        |w| w.cue(saga, "b", &[Cue::LoseReply; 4]),
        &world,
    )
    .await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Compensated);
    assert_eq!(
        world.undone(saga),
        vec!["b", "a"],
        "b itself is undone, then a"
    );
    assert_consistent(&world, saga, status);
}

async fn a_lost_reply_then_a_retry_completes_with_one_effect(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    scripted::start_with(
        &engine,
        saga,
        |w| w.cue(saga, "c", &[Cue::LoseReply, Cue::Fail]),
        &world,
    )
    .await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Completed);
    assert_eq!(world.forward_calls(saga, "c"), 3);
    assert_consistent(&world, saga, status);
}

async fn a_hung_call_counts_as_unknown_and_the_budget_is_kept(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    scripted::start_with(
        &engine,
        saga,
        |w| {
            w.cue(
                saga,
                "a",
                &[Cue::Hang, Cue::Fail, Cue::Fail, Cue::Fail, Cue::Ok],
            )
        },
        &world,
    )
    .await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Compensated, "unknown after 4 attempts");
    assert_eq!(
        world.forward_calls(saga, "a"),
        4,
        "the budget is 4 attempts"
    );
    assert_consistent(&world, saga, status);
}

async fn a_compensation_that_fails_is_retried_until_it_succeeds(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    scripted::start_with(
        &engine,
        saga,
        |w| {
            w.cue(saga, "c", &[Cue::Refuse]);
            w.cue_compensation(saga, "a", &[Cue::Fail; 7]);
        },
        &world,
    )
    .await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Compensated);
    let attempts: i64 = sqlx::query_scalar(
        "SELECT attempts FROM saga_steps WHERE saga_id = $1 AND phase = 'compensation' AND name = 'a'",
    )
    .bind(saga.to_string())
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 8, "seven failures, then success");
    assert_consistent(&world, saga, status);
}

/// Sagas started together share the log's batches (on PostgreSQL, one
/// statement applies a whole batch): each must still get its own state and
/// step records, never a neighbour's.
async fn many_sagas_at_once_each_end_by_their_own_script(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let sagas: Vec<(uuid::Uuid, bool)> = (0..48)
        .map(|i| (uuid::Uuid::new_v4(), i % 3 == 0))
        .collect();
    for (saga, refused) in &sagas {
        if *refused {
            world.cue(*saga, "c", &[Cue::Refuse]);
        }
    }
    futures::future::join_all(sagas.iter().map(|(saga, _)| {
        let engine = &engine;
        let world = &world;
        async move { scripted::start_with(engine, *saga, |_| (), world).await }
    }))
    .await;
    for (saga, refused) in &sagas {
        let status = scripted::terminal(&store.pool, *saga).await;
        let (expected, steps) = if *refused {
            // a, b and c forward; b and a undone.
            (
                SagaStatus::Compensated,
                vec![
                    "forward a SUCCEEDED",
                    "forward b SUCCEEDED",
                    "forward c FAILED",
                    "compensation a SUCCEEDED",
                    "compensation b SUCCEEDED",
                ],
            )
        } else {
            (
                SagaStatus::Completed,
                vec![
                    "forward a SUCCEEDED",
                    "forward b SUCCEEDED",
                    "forward c SUCCEEDED",
                ],
            )
        };
        assert_eq!(status, expected, "saga {saga}");
        assert_consistent(&world, *saga, status);
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT phase, name, status FROM saga_steps WHERE saga_id = $1 ORDER BY phase DESC, name",
        )
        .bind(saga.to_string())
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let rows: Vec<String> = rows
            .into_iter()
            .map(|(phase, name, status)| format!("{phase} {name} {status}"))
            .collect();
        assert_eq!(rows, steps, "saga {saga}'s step records");
    }
}

/// A step settled by its first attempt keeps no attempt records; a retried
/// one keeps each attempt, in order, with its times and its error (none for
/// the one that settled it), forward and compensation alike.
async fn each_attempt_of_a_retried_step_is_kept_with_its_times_and_error(backend: Backend) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let engine = scripted::engine(&world, &store.pool, scripted::policy());
    let saga = uuid::Uuid::new_v4();
    scripted::start_with(
        &engine,
        saga,
        |w| {
            w.cue(saga, "b", &[Cue::Fail, Cue::Fail]);
            w.cue(saga, "c", &[Cue::Refuse]);
            w.cue_compensation(saga, "a", &[Cue::Fail; 3]);
        },
        &world,
    )
    .await;
    let status = scripted::terminal(&store.pool, saga).await;
    assert_eq!(status, SagaStatus::Compensated);
    let history = engine.history(saga).await.unwrap();
    let attempts: Vec<(Phase, i64, i64, bool)> = history
        .attempts
        .iter()
        .map(|a| (a.phase, a.step_index, a.attempt, a.error.is_empty()))
        .collect();
    let mut expected = vec![
        (Phase::Forward, 1, 1, false),
        (Phase::Forward, 1, 2, false),
        (Phase::Forward, 1, 3, true),
    ];
    expected.extend((1..=3).map(|n| (Phase::Compensation, 0, n, false)));
    expected.push((Phase::Compensation, 0, 4, true));
    assert_eq!(attempts, expected, "{history:?}");
    for a in &history.attempts {
        assert!(a.started_at_ms <= a.finished_at_ms, "{a:?}");
    }
    assert!(
        history
            .attempts
            .windows(2)
            .all(|w| w[0].started_at_ms <= w[1].started_at_ms),
        "oldest first: {history:?}"
    );
    assert_consistent(&world, saga, status);
}

/// A saga resting NEEDS_ATTENTION (its compensation of b keeps failing),
/// on an engine that gives up on a compensation after 300 ms.
async fn a_saga_needing_attention(
    backend: Backend,
) -> (
    store::TestStore,
    Arc<World>,
    saga_engine::Engine<scripted::Script>,
    uuid::Uuid,
) {
    let store = store::fresh(backend).await;
    let world = Arc::new(World::default());
    let policy = saga_engine::RetryPolicy {
        compensation_attention_after: Some(std::time::Duration::from_millis(300)),
        ..scripted::policy()
    };
    let engine = scripted::engine(&world, &store.pool, policy);
    let saga = uuid::Uuid::new_v4();
    scripted::rest_needing_attention(&engine, saga, &world, &store.pool).await;
    (store, world, engine, saga)
}

/// An operator's retry whose caller is dropped once the log has committed
/// it (a client that left, a deadline that passed) must still be carried
/// out. Before, what came after the commit ran in the caller's future: the
/// saga was left COMPENSATING with no driver until the next start, and a
/// retry of the same request was answered "replayed", changing nothing.
async fn a_reopen_whose_caller_left_after_its_commit_is_driven_to_its_end(backend: Backend) {
    use saga_engine::{Reopen, ReopenOutcome};

    let (store, world, engine, saga) = a_saga_needing_attention(backend).await;
    // The cause fixed, the operator retries and leaves at once: the call is
    // polled once (which hands the action to the log, whose commit follows
    // whoever waits for it), then dropped.
    world.clear_compensation_cues(saga, "b");
    let reopen = || Reopen {
        saga_id: saga,
        request_id: "retry-then-leave".into(),
        resolved_by_hand: None,
    };
    let mut call = Box::pin(engine.reopen(reopen()));
    assert!(
        futures::poll!(call.as_mut()).is_pending(),
        "the reopen ended at its first poll: the test shows nothing"
    );
    drop(call);

    // NEEDS_ATTENTION until the reopen's commit, COMPENSATING until its
    // driver has undone b and a.
    scripted::until_status(
        &store.pool,
        saga,
        SagaStatus::Compensated,
        "a reopen whose caller left (COMPENSATING: nothing drives it; \
         NEEDS_ATTENTION: the reopen was never committed)",
    )
    .await;
    assert_eq!(world.undone(saga), vec!["b", "a"]);
    // The same request again changes nothing.
    assert_eq!(
        engine.reopen(reopen()).await.unwrap(),
        ReopenOutcome::Replayed
    );
}

/// A reopen committed while a look holds the saga (`ensure_driven`: a
/// client's replay of its CreateOrder, which holds the saga while it reads
/// whether it is open), the look's caller leaving at once: the reopened saga
/// must be driven to its end. Before the nineteenth session the look ran in
/// its caller's future: dropped, it let go of the saga the reopen had left
/// to it, and nothing drove it (still COMPENSATING after 10 s, on both
/// stores). Now the look runs on, and a holder that lets go of a saga left
/// to it looks at it again (`holds`, whose unit tests show that part: here
/// the order of the look's read and the reopen's commit is not the test's).
async fn a_reopen_that_found_its_saga_claimed_by_a_look_that_then_left_is_still_driven(
    backend: Backend,
) {
    use saga_engine::{Reopen, ReopenOutcome};

    let (store, world, engine, saga) = a_saga_needing_attention(backend).await;
    world.clear_compensation_cues(saga, "b");

    // The look claims the saga and waits on its read.
    let mut look = Box::pin(engine.ensure_driven(saga));
    assert!(
        futures::poll!(look.as_mut()).is_pending(),
        "the look ended at its first poll: the test shows nothing"
    );
    let reopened = engine
        .reopen(Reopen {
            saga_id: saga,
            request_id: "retry-while-looked-at".into(),
            resolved_by_hand: None,
        })
        .await
        .unwrap();
    assert_eq!(reopened, ReopenOutcome::Reopened);
    // Its client leaves: the claim goes with it.
    drop(look);

    scripted::until_status(
        &store.pool,
        saga,
        SagaStatus::Compensated,
        "a reopen that found it held by a look that left",
    )
    .await;
    assert_eq!(world.undone(saga), vec!["b", "a"]);
}

/// Two operators resolve the same resting saga at once (a double click in
/// the explorer, or the explorer and a bulk retry), with different request
/// IDs: one wins, and the other is told the saga no longer rests, having
/// written nothing: no step resolved under its note, no action recorded.
/// On PostgreSQL each action is a transaction of its own: the test holds
/// the saga's row until both have read it. (Seen failing there before: both
/// were answered Reopened, and the loser's note overwrote the winner's.)
async fn two_operators_resolving_one_saga_at_once_one_wins_and_the_other_changes_nothing(
    backend: Backend,
) {
    use std::time::Duration;

    use saga_engine::{Reopen, ReopenOutcome};
    use sqlx::Row;

    let (store, _world, engine, saga) = a_saga_needing_attention(backend).await;
    let resolve = |who: &str| Reopen {
        saga_id: saga,
        request_id: format!("resolve-by-{who}"),
        resolved_by_hand: Some(format!("undone by {who}")),
    };

    let lock = match backend {
        Backend::Postgres => {
            let mut lock = store.pool.begin().await.unwrap();
            sqlx::query("SELECT saga_id FROM sagas WHERE saga_id = $1 FOR UPDATE")
                .bind(saga.to_string())
                .execute(&mut *lock)
                .await
                .unwrap();
            Some(lock)
        }
        // Every write of the log goes through one thread, one at a time.
        Backend::Sqlite => None,
    };
    let (ann, bob) = (engine.reopen(resolve("ann")), engine.reopen(resolve("bob")));
    let release = async {
        let Some(lock) = lock else { return };
        // Both have read the saga and wait for its row.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&store.pool)
            .await
            .unwrap();
            if waiting >= 2 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the two actions never both waited for the saga's row"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lock.rollback().await.unwrap();
    };
    let (ann, bob, ()) = tokio::join!(ann, bob, release);
    let outcomes = [ann.unwrap(), bob.unwrap()];
    let winner = match outcomes {
        [ReopenOutcome::Reopened, ReopenOutcome::NotResting(_)] => "ann",
        [ReopenOutcome::NotResting(_), ReopenOutcome::Reopened] => "bob",
        other => {
            panic!("one action wins and the other finds the saga no longer resting: {other:?}")
        }
    };
    let actions = sqlx::query("SELECT request_id FROM saga_actions WHERE saga_id = $1")
        .bind(saga.to_string())
        .fetch_all(&store.pool)
        .await
        .unwrap();
    let actions: Vec<String> = actions.iter().map(|row| row.get(0)).collect();
    assert_eq!(actions, vec![format!("resolve-by-{winner}")]);
    scripted::until_status(
        &store.pool,
        saga,
        SagaStatus::Compensated,
        "a resolve by hand",
    )
    .await;
    let note: String = sqlx::query_scalar(
        "SELECT output FROM saga_steps WHERE saga_id = $1 AND phase = 'compensation' AND name = 'b'",
    )
    .bind(saga.to_string())
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!(
        note,
        format!("undone by {winner}"),
        "the winner's note stands"
    );
}

/// An operator's request ID names one action: a resolve sent again with
/// the same ID but another note (another operator or reason) is refused as
/// a reused ID, not answered as a replay that drops the new note; the same
/// resolve again replays. (Seen failing before: answered Replayed.)
async fn a_resolve_replayed_with_another_note_is_refused_and_the_same_one_replays(
    backend: Backend,
) {
    use saga_engine::{Reopen, ReopenOutcome};

    let (store, _world, engine, saga) = a_saga_needing_attention(backend).await;
    let resolve = |note: &str| Reopen {
        saga_id: saga,
        request_id: "resolve-once".into(),
        resolved_by_hand: Some(note.into()),
    };
    assert_eq!(
        engine
            .reopen(resolve("by ann: refunded by hand"))
            .await
            .unwrap(),
        ReopenOutcome::Reopened
    );
    scripted::until_status(&store.pool, saga, SagaStatus::Compensated, "a resolve").await;
    assert_eq!(
        engine
            .reopen(resolve("by bob: shipped back"))
            .await
            .unwrap(),
        ReopenOutcome::RequestIdReused
    );
    assert_eq!(
        engine
            .reopen(resolve("by ann: refunded by hand"))
            .await
            .unwrap(),
        ReopenOutcome::Replayed
    );
}
