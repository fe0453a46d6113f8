//! Property test: random schedules of refusals, lost replies, failures,
//! cancels and restarts against the scripted saga. After each, the saga is
//! terminal; no step has more than one net effect; a completed saga has every
//! effect and any other none; compensations ran in reverse order; and an
//! accepted cancel ended CANCELLED.

use std::{sync::Arc, time::Duration};

use proptest::{prelude::*, test_runner::TestRunner};
use saga_engine::{CancelOutcome, SagaStatus};
use uuid::Uuid;

use crate::{
    scripted::{self, Cue, STEPS, World, assert_consistent},
    store::{self, Backend, TestStore},
};

#[derive(Debug, Clone)]
enum Disruption {
    Cancel,
    /// The process stops (at the next checkpoint) and a new one resumes.
    Restart,
}

#[derive(Debug, Clone)]
struct Schedule {
    /// Cues of each step's forward attempts; later attempts succeed.
    forward: Vec<Vec<Cue>>,
    /// Failed attempts of each step's compensation before it succeeds.
    compensation_failures: Vec<usize>,
    /// Disruptions, each after so many milliseconds from the previous one.
    disruptions: Vec<(u64, Disruption)>,
}

fn cue() -> impl Strategy<Value = Cue> {
    prop_oneof![
        3 => Just(Cue::Ok),
        1 => Just(Cue::Refuse),
        2 => Just(Cue::LoseReply),
        2 => Just(Cue::Fail),
    ]
}

fn schedule() -> impl Strategy<Value = Schedule> {
    (
        prop::collection::vec(prop::collection::vec(cue(), 0..6), STEPS.len()),
        prop::collection::vec(0usize..3, STEPS.len()),
        prop::collection::vec(
            (
                0u64..15,
                prop_oneof![Just(Disruption::Cancel), Just(Disruption::Restart)],
            ),
            0..3,
        ),
    )
        .prop_map(|(forward, compensation_failures, disruptions)| Schedule {
            forward,
            compensation_failures,
            disruptions,
        })
}

async fn check(store: &TestStore, schedule: Schedule) {
    let world = Arc::new(World::default());
    let saga = Uuid::new_v4();
    for (i, step) in STEPS.iter().enumerate() {
        world.cue(saga, step, &schedule.forward[i]);
        world.cue_compensation(
            saga,
            step,
            &vec![Cue::Fail; schedule.compensation_failures[i]],
        );
    }
    let mut engine = scripted::engine(&world, &store.pool, scripted::policy());
    scripted::start_with(&engine, saga, |_| {}, &world).await;
    let mut cancel_accepted = false;
    for (after_ms, disruption) in &schedule.disruptions {
        tokio::time::sleep(Duration::from_millis(*after_ms)).await;
        match disruption {
            Disruption::Cancel => {
                cancel_accepted |= engine.cancel(saga).await.unwrap() == CancelOutcome::Accepted;
            }
            Disruption::Restart => {
                engine.shutdown(Duration::from_secs(30)).await;
                engine = scripted::engine(&world, &store.pool, scripted::policy());
                engine.recover().await.unwrap();
            }
        }
    }
    let status = scripted::terminal(&store.pool, saga).await;
    assert_consistent(&world, saga, status);
    if cancel_accepted {
        assert_eq!(status, SagaStatus::Cancelled, "an accepted cancel wins");
    }
    engine.shutdown(Duration::from_secs(30)).await;
}

fn run(backend: Backend) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(store::fresh(backend));
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 40,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&schedule(), |schedule| {
        runtime.block_on(check(&store, schedule));
        Ok(())
    });
    drop(store);
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

#[test]
fn random_schedules_keep_every_invariant_on_sqlite() {
    run(Backend::Sqlite)
}

#[test]
fn random_schedules_keep_every_invariant_on_postgres() {
    run(Backend::Postgres)
}
