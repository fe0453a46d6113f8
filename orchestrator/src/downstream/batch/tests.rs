//! The batcher against a scripted method: what goes in which batch, and
//! what each call hears.

use std::sync::Mutex as StdMutex;

use tokio::sync::Semaphore;
use tonic_types::{ErrorDetails, StatusExt};

use super::*;

/// How the scripted service answers a batch of these items.
type Answer = dyn Fn(&[u32]) -> Answers<u32> + Send + Sync;

/// A method whose batches wait for the test's go-ahead, one permit each,
/// and answer each item `n` with `n * 10`, or with what `answer` says.
#[derive(Clone)]
struct Scripted {
    inner: Arc<ScriptedInner>,
}

struct ScriptedInner {
    gate: Semaphore,
    /// The slots on the scripted service's link.
    slots: Arc<Semaphore>,
    /// The items of every batch sent, in the order sent.
    batches: StdMutex<Vec<Vec<u32>>>,
    /// Calls sent one by one.
    alone: StdMutex<Vec<u32>>,
    answer: Box<Answer>,
}

impl Scripted {
    fn new(answer: impl Fn(&[u32]) -> Answers<u32> + Send + Sync + 'static) -> Self {
        Scripted {
            inner: Arc::new(ScriptedInner {
                gate: Semaphore::new(0),
                slots: Arc::new(Semaphore::new(BATCHES_IN_FLIGHT)),
                batches: StdMutex::new(Vec::new()),
                alone: StdMutex::new(Vec::new()),
                answer: Box::new(answer),
            }),
        }
    }

    fn times_ten() -> Self {
        Scripted::new(|items| Ok(items.iter().map(|n| Ok(n * 10)).collect()))
    }

    fn open(&self, batches: usize) {
        self.inner.gate.add_permits(batches);
    }

    fn batches(&self) -> Vec<Vec<u32>> {
        self.inner.batches.lock().unwrap().clone()
    }
}

impl Method for Scripted {
    type Request = u32;
    type Reply = u32;

    /// A request of 1,000 or more is that many bytes (a large order); any
    /// other, 8.
    fn size(&self, request: &u32) -> usize {
        if *request >= 1_000 {
            *request as usize
        } else {
            8
        }
    }

    type Slot = tokio::sync::OwnedSemaphorePermit;

    /// Waits as long as it takes: the test holds the slots.
    fn slot(&self, _budget: Duration) -> BoxFuture<'static, Result<Self::Slot, Status>> {
        let slots = self.inner.slots.clone();
        Box::pin(async move { Ok(slots.acquire_owned().await.unwrap()) })
    }

    fn send_batch(
        &self,
        slot: Self::Slot,
        items: Vec<Outgoing<u32>>,
        _budget: Duration,
    ) -> BoxFuture<'static, Answers<u32>> {
        let inner = self.inner.clone();
        let items: Vec<u32> = items.into_iter().map(|o| o.request).collect();
        inner.batches.lock().unwrap().push(items.clone());
        Box::pin(async move {
            let _slot = slot;
            inner.gate.acquire().await.unwrap().forget();
            (inner.answer)(&items)
        })
    }

    fn send_one(
        &self,
        request: u32,
        _timeout: Duration,
    ) -> BoxFuture<'static, Result<u32, Status>> {
        self.inner.alone.lock().unwrap().push(request);
        Box::pin(async move { Ok(request * 10) })
    }
}

const LONG: Duration = Duration::from_secs(10);

/// Waits until `n` batches were sent.
async fn until_sent(method: &Scripted, n: usize) {
    for _ in 0..10_000 {
        if method.batches().len() >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{n} batches were never sent: {:?}", method.batches());
}

/// Waits until `n` calls wait for a send.
async fn until_waiting(batcher: &Batcher<Scripted>, n: usize) {
    for _ in 0..1000 {
        if batcher.shared.state.lock().unwrap().waiting.len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{n} calls never waited");
}

#[tokio::test]
async fn a_call_alone_goes_at_once_and_hears_its_own_answer() {
    let method = Scripted::times_ten();
    method.open(1);
    let batcher = Batcher::new(method.clone());
    assert_eq!(batcher.call(7, LONG).await.unwrap(), 70);
    assert_eq!(method.batches(), vec![vec![7]]);
}

#[tokio::test]
async fn calls_made_while_both_sends_are_out_go_together_each_with_its_answer() {
    let method = Scripted::times_ten();
    let batcher = Batcher::new(method.clone());
    let mut calls = Vec::new();
    for n in 0..12 {
        let batcher = batcher.clone();
        calls.push(tokio::spawn(async move { batcher.call(n, LONG).await }));
        if n < BATCHES_IN_FLIGHT as u32 {
            // The first two each find a send free.
            until_sent(&method, n as usize + 1).await;
        }
    }
    until_waiting(&batcher, 10).await;
    method.open(3);
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap().unwrap());
    }
    assert_eq!(answers, (0..12).map(|n| n * 10).collect::<Vec<_>>());
    let batches = method.batches();
    assert_eq!(batches.len(), 3, "{batches:?}");
    assert_eq!(batches[0], vec![0]);
    assert_eq!(batches[1], vec![1]);
    assert_eq!(batches[2], (2..12).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_batch_takes_at_most_max_items_and_the_rest_follow() {
    let method = Scripted::times_ten();
    let batcher = Batcher::new(method.clone());
    let mut calls = Vec::new();
    for n in 0..(2 + MAX_ITEMS as u32 + 5) {
        let batcher = batcher.clone();
        calls.push(tokio::spawn(async move { batcher.call(n, LONG).await }));
        if n < 2 {
            until_sent(&method, n as usize + 1).await;
        }
    }
    until_waiting(&batcher, MAX_ITEMS + 5).await;
    method.open(10);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let sizes: Vec<usize> = method.batches().iter().map(Vec::len).collect();
    assert_eq!(sizes[..2], [1, 1]);
    assert_eq!(sizes[2..].iter().sum::<usize>(), MAX_ITEMS + 5);
    assert!(sizes.iter().all(|&n| n <= MAX_ITEMS), "{sizes:?}");
}

#[tokio::test]
async fn each_call_hears_its_own_refusal_with_its_details() {
    let method = Scripted::new(|items| {
        Ok(items
            .iter()
            .map(|&n| {
                if n == 2 {
                    Err(Status::with_error_details(
                        Code::FailedPrecondition,
                        "out of stock",
                        ErrorDetails::with_error_info(
                            "OUT_OF_STOCK",
                            "stock",
                            std::collections::HashMap::new(),
                        ),
                    ))
                } else {
                    Ok(n * 10)
                }
            })
            .collect())
    });
    method.open(10);
    let batcher = Batcher::new(method);
    let refused = batcher.call(2, LONG).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        refused.get_details_error_info().unwrap().reason,
        "OUT_OF_STOCK"
    );
    assert_eq!(batcher.call(3, LONG).await.unwrap(), 30);
}

#[tokio::test]
async fn a_batch_that_fails_whole_fails_each_call_with_what_it_says_of_the_call() {
    for (batch_code, call_code) in [
        (Code::Unavailable, Code::Unavailable),
        (Code::DeadlineExceeded, Code::DeadlineExceeded),
        (Code::Unauthenticated, Code::Unauthenticated),
        // The batch's shape refused says nothing of the call: never a
        // definite refusal of the step.
        (Code::InvalidArgument, Code::Internal),
    ] {
        let method = Scripted::new(move |_| Err(Status::new(batch_code, "whole batch")));
        method.open(10);
        let batcher = Batcher::new(method);
        let status = batcher.call(1, LONG).await.unwrap_err();
        assert_eq!(status.code(), call_code, "{batch_code:?}");
    }
}

#[tokio::test]
async fn an_answer_with_the_wrong_number_of_results_fails_every_call() {
    let method = Scripted::new(|_| Ok(vec![Ok(1), Ok(2)]));
    method.open(10);
    let batcher = Batcher::new(method);
    let status = batcher.call(1, LONG).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("1 calls with 2 results"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_service_without_the_batch_method_is_called_one_by_one() {
    let method = Scripted::new(|_| Err(Status::unimplemented("unknown method ReserveStockBatch")));
    method.open(10);
    let batcher = Batcher::new(method.clone());
    // The call in the refused batch never ran: an unknown outcome, retried.
    let status = batcher.call(1, LONG).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    // Its retry, and the next calls, go alone.
    assert_eq!(batcher.call(1, LONG).await.unwrap(), 10);
    assert_eq!(batcher.call(2, LONG).await.unwrap(), 20);
    assert_eq!(*method.inner.alone.lock().unwrap(), vec![1, 2]);
    assert_eq!(method.batches().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_ends_at_its_own_deadline_whatever_its_batch_does() {
    let method = Scripted::times_ten();
    let batcher = Batcher::new(method.clone());
    let started = Instant::now();
    let status = batcher
        .call(1, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(310),
        "{waited:?}"
    );
    // The batch is still out; once it answers, its send is free again.
    method.open(10);
    for _ in 0..1000 {
        if batcher.shared.state.lock().unwrap().sending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(batcher.shared.state.lock().unwrap().sending, 0);
    assert_eq!(batcher.call(2, LONG).await.unwrap(), 20);
}

#[tokio::test(start_paused = true)]
async fn a_call_with_too_little_of_its_deadline_left_is_not_sent() {
    let method = Scripted::times_ten();
    let batcher = Batcher::new(method.clone());
    // Both sends are out; the third call waits for one.
    let first = tokio::spawn({
        let batcher = batcher.clone();
        async move { batcher.call(1, LONG).await }
    });
    until_sent(&method, 1).await;
    let second = tokio::spawn({
        let batcher = batcher.clone();
        async move { batcher.call(2, LONG).await }
    });
    until_sent(&method, 2).await;
    let third = tokio::spawn({
        let batcher = batcher.clone();
        async move {
            batcher
                .call(3, MIN_BUDGET + Duration::from_millis(10))
                .await
        }
    });
    until_waiting(&batcher, 1).await;
    // When a send is free again, the third has less than MIN_BUDGET left.
    tokio::time::sleep(Duration::from_millis(20)).await;
    method.open(2);
    assert_eq!(first.await.unwrap().unwrap(), 10);
    assert_eq!(second.await.unwrap().unwrap(), 20);
    let status = third.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(method.batches(), vec![vec![1], vec![2]]);
}

// On a worker of the multi-threaded runtime, as in the orchestrator: a task
// spawned there runs next, before the callers already queued, unless it
// steps back first.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn calls_made_in_the_same_moment_go_in_one_batch() {
    // As sagas woken by one commit of the log: each makes its call before
    // any send has run.
    let method = Scripted::times_ten();
    method.open(10);
    let batcher = Batcher::new(method.clone());
    // Spawned from a worker, as a commit of the log wakes its sagas.
    let calls = tokio::spawn({
        let batcher = batcher.clone();
        async move {
            (0..5)
                .map(|n| {
                    let batcher = batcher.clone();
                    tokio::spawn(async move { batcher.call(n, LONG).await })
                })
                .collect::<Vec<_>>()
        }
    })
    .await
    .unwrap();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), n as u32 * 10);
    }
    let mut batches = method.batches();
    assert_eq!(batches.len(), 1, "{batches:?}");
    batches[0].sort();
    assert_eq!(batches[0], [0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn a_batch_stops_short_of_the_services_request_limit() {
    let method = Scripted::times_ten();
    let batcher = Batcher::new(method.clone());
    let mut calls = Vec::new();
    // Two small calls take both sends; then five large orders of 20,000
    // bytes and one of 100,000 wait.
    for n in [0, 1, 20_000, 20_001, 20_002, 20_003, 20_004, 100_000] {
        let batcher = batcher.clone();
        calls.push(tokio::spawn(async move { batcher.call(n, LONG).await }));
        if n < 2 {
            until_sent(&method, n as usize + 1).await;
        }
    }
    until_waiting(&batcher, 6).await;
    method.open(10);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let batches = method.batches();
    assert_eq!(
        batches[2..],
        [
            vec![20_000, 20_001],
            vec![20_002, 20_003],
            vec![20_004],
            // Too large for any batch: alone, as it would go without them.
            vec![100_000],
        ],
        "{batches:?}"
    );
    for batch in &batches {
        let bytes: usize = batch.iter().map(|n| method.size(n) + ITEM_OVERHEAD).sum();
        assert!(bytes <= MAX_BATCH_BYTES || batch.len() == 1, "{batch:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_deadline_runs_out_while_its_batch_waits_for_a_slot_is_not_sent() {
    let method = Scripted::times_ten();
    method.open(10);
    // The link is full: every slot is held by calls of other methods.
    let held = method
        .inner
        .slots
        .clone()
        .acquire_many_owned(BATCHES_IN_FLIGHT as u32)
        .await
        .unwrap();
    let batcher = Batcher::new(method.clone());
    let call = |n, timeout| {
        let batcher = batcher.clone();
        tokio::spawn(async move { batcher.call(n, timeout).await })
    };
    // In one batch: calls with a deadline of 1 s, of 1.52 s and of 10 s.
    let short = call(1, Duration::from_secs(1));
    let nearly = call(2, Duration::from_millis(1520));
    let long = call(3, LONG);
    until_waiting(&batcher, 0).await;
    // A slot comes free after 1.5 s: the first call's deadline has passed
    // (its caller gave up), and the second has 20 ms left, less than
    // MIN_BUDGET. Sent, both would be run by a service whose callers no
    // longer wait: under overload, work that only deepens it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(held);
    assert_eq!(long.await.unwrap().unwrap(), 30);
    for call in [short, nearly] {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    // Only the call that still had time went.
    assert_eq!(method.batches(), vec![vec![3]]);
}
