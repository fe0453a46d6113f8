//! A saga step's calls of one method, sent to the service in batches.
//!
//! Every saga calls its steps on its own task. One by one, each call cost
//! an HTTP/2 stream, its headers, the layers and a task on both sides: with
//! the service's own work, about a fifth of a saga's CPU (docs/benchmarks.md).
//! Here a call joins its method's queue, and the queue goes out as one batch
//! RPC (`ReserveStockBatch`, ...) whenever one of [`BATCHES_IN_FLIGHT`]
//! sends is free. A call that finds a send free starts it, and the send
//! takes the queue after one turn at the back of the scheduler's queue: the
//! sagas that one commit of the log woke make their calls in that turn, and
//! go together. At low load a call goes at once, alone. Under load the calls
//! that came while both sends were out go together, so a batch's size
//! follows the load, with no timer.
//!
//! Each call keeps what it had alone:
//! - its own deadline: it ends DEADLINE_EXCEEDED when that passes, whatever
//!   its batch does; a batch's deadline is the latest of its items', and an
//!   item with less than [`MIN_BUDGET`] left once its batch has a slot on
//!   the service's link is not sent (as a call alone would not be);
//! - its trace context, which the service's span of the item continues;
//! - its answer, the service's status with its details included.
//!
//! A batch that fails as a whole (the connection broke, the reply was lost)
//! fails each of its calls with its status: an unknown outcome for the
//! step, retried with the same `request_id`. A service that does not know
//! the batch method (an older version, during a rolling upgrade) is called
//! one by one for a minute, then asked again.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, future::BoxFuture};
use tokio::{sync::oneshot, time::Instant};
use tonic::{Code, Status};

use super::MIN_BUDGET;

/// Batches of one method out at once. With two, one batch is on its way
/// while the service works on the other.
pub const BATCHES_IN_FLIGHT: usize = 2;

/// Most calls in one batch (the services take up to 256).
pub const MAX_ITEMS: usize = 128;

/// Most bytes of calls in one batch: the services refuse a request of more
/// than `svc_kit::server::MAX_REQUEST_BYTES` (64 KiB) whole, so a batch of
/// large orders stops short of it, with room for its framing. A call too
/// large for it goes alone, and fares as it would without batches.
pub const MAX_BATCH_BYTES: usize = svc_kit::server::MAX_REQUEST_BYTES * 3 / 4;

/// What a batch item adds to its request's bytes: its tags, lengths and
/// trace context's (the trace context's own bytes are counted apart).
const ITEM_OVERHEAD: usize = 16;

/// How long a service that answered UNIMPLEMENTED to a batch is called one
/// by one before it is asked again.
const UNARY_FOR: Duration = Duration::from_secs(60);

/// One call as its batch carries it.
pub struct Outgoing<T> {
    pub request: T,
    /// The caller's W3C trace context.
    pub traceparent: String,
    pub tracestate: String,
}

/// A batch's answer: one result per item, in their order, or the status of
/// the whole batch.
pub type Answers<R> = Result<Vec<Result<R, Status>>, Status>;

/// How one method is called: in a batch, or alone.
pub trait Method: Send + Sync + 'static {
    type Request: Send + 'static;
    type Reply: Send + 'static;

    /// The bytes `request` takes encoded.
    fn size(&self, request: &Self::Request) -> usize;

    /// What a batch holds while it is out: its place among the calls in
    /// flight on the service's link.
    type Slot: Send + 'static;

    /// Waits for a slot for a batch whose deadline is `budget` from now;
    /// DEADLINE_EXCEEDED, nothing sent, when less than [`MIN_BUDGET`] of
    /// it would be left.
    fn slot(&self, budget: Duration) -> BoxFuture<'static, Result<Self::Slot, Status>>;

    /// The batch RPC with `items`, within `budget`, in `slot`.
    fn send_batch(
        &self,
        slot: Self::Slot,
        items: Vec<Outgoing<Self::Request>>,
        budget: Duration,
    ) -> BoxFuture<'static, Answers<Self::Reply>>;

    /// The unary RPC, for a service without the batch method.
    fn send_one(
        &self,
        request: Self::Request,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Self::Reply, Status>>;
}

/// The calls of one method, batched.
pub struct Batcher<M: Method> {
    shared: Arc<Shared<M>>,
}

impl<M: Method> Clone for Batcher<M> {
    fn clone(&self) -> Self {
        Batcher {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<M: Method> {
    method: M,
    state: Mutex<State<M>>,
}

struct State<M: Method> {
    /// Calls waiting for a send, oldest first.
    waiting: Vec<Waiting<M>>,
    /// Sends out now, at most [`BATCHES_IN_FLIGHT`].
    sending: usize,
    /// Until when calls go one by one (the service has no batch method).
    unary_until: Option<Instant>,
}

struct Waiting<M: Method> {
    call: Outgoing<M::Request>,
    /// Its bytes in a batch.
    size: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<M::Reply, Status>>,
}

impl<M: Method> Batcher<M> {
    pub fn new(method: M) -> Self {
        Batcher {
            shared: Arc::new(Shared {
                method,
                state: Mutex::new(State {
                    waiting: Vec::new(),
                    sending: 0,
                    unary_until: None,
                }),
            }),
        }
    }

    /// Calls the method with `request`, within `timeout`, in the next batch.
    pub async fn call(&self, request: M::Request, timeout: Duration) -> Result<M::Reply, Status> {
        if self.shared.calls_alone() {
            return self.shared.method.send_one(request, timeout).await;
        }
        let deadline = Instant::now() + timeout;
        let (traceparent, tracestate) = svc_kit::propagation::current_context();
        let (reply, answer) = oneshot::channel();
        let call = Outgoing {
            request,
            traceparent,
            tracestate,
        };
        let start_send = {
            let size = self.shared.method.size(&call.request)
                + call.traceparent.len()
                + call.tracestate.len()
                + ITEM_OVERHEAD;
            let mut state = self.shared.state.lock().expect("batcher state");
            state.waiting.push(Waiting {
                call,
                size,
                deadline,
                reply,
            });
            let free = state.sending < BATCHES_IN_FLIGHT;
            if free {
                state.sending += 1;
            }
            free
        };
        if start_send {
            tokio::spawn(self.shared.clone().send_while_waiting());
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable(
                "the batch that carried the call was lost before its answer",
            )),
            Err(_) => Err(Status::deadline_exceeded(
                "no answer within the call's deadline",
            )),
        }
    }
}

impl<M: Method> State<M> {
    /// The oldest waiting calls, as many as fit in a batch: at most
    /// [`MAX_ITEMS`] and [`MAX_BATCH_BYTES`], and at least one.
    fn take_batch(&mut self) -> Vec<Waiting<M>> {
        let mut bytes = 0;
        let n = self
            .waiting
            .iter()
            .take(MAX_ITEMS)
            .take_while(|waiting| {
                bytes += waiting.size;
                bytes <= MAX_BATCH_BYTES
            })
            .count()
            .max(1);
        self.waiting.drain(..n.min(self.waiting.len())).collect()
    }
}

impl<M: Method> Shared<M> {
    /// Whether calls go one by one now (the service has no batch method).
    fn calls_alone(&self) -> bool {
        let state = self.state.lock().expect("batcher state");
        state
            .unary_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// One of the [`BATCHES_IN_FLIGHT`] sends: sends what waits, batch after
    /// batch, until nothing does.
    async fn send_while_waiting(self: Arc<Self>) {
        // The sagas a commit of the log wakes together make their calls
        // within a moment of each other: to the back of the queue once, so
        // that those woken with the caller join its batch.
        tokio::task::yield_now().await;
        loop {
            let batch = {
                let mut state = self.state.lock().expect("batcher state");
                if state.waiting.is_empty() {
                    state.sending -= 1;
                    return;
                }
                state.take_batch()
            };
            // A panic while sending loses that batch's answers (its calls
            // hear UNAVAILABLE), never this send: the next batch goes out.
            let _ = AssertUnwindSafe(self.send(batch)).catch_unwind().await;
        }
    }

    async fn send(&self, batch: Vec<Waiting<M>>) {
        let (batch, Some(latest)) = still_due(batch) else {
            return;
        };
        // The link may be full (its slots are shared with the one-by-one
        // calls): the wait may outlast some of the batch's deadlines.
        let slot = match self.method.slot(latest - Instant::now()).await {
            Ok(slot) => slot,
            Err(status) => {
                return fail_all(batch.into_iter().map(|w| w.reply).collect(), status);
            }
        };
        // What the wait left of each: sent with too little, a call would be
        // run by the service for a caller that no longer waits, work that
        // only deepens an overload.
        let (batch, Some(latest)) = still_due(batch) else {
            return;
        };
        let (calls, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|waiting| (waiting.call, waiting.reply))
            .unzip();
        let count = calls.len();
        let budget = latest.saturating_duration_since(Instant::now());
        match self.method.send_batch(slot, calls, budget).await {
            Ok(results) if results.len() == count => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Ok(results) => {
                let status = Status::internal(format!(
                    "the service answered a batch of {count} calls with {} results",
                    results.len()
                ));
                fail_all(replies, status);
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::warn!(
                    "the service has no batch method ({}); calling it one by one for {} s",
                    status.message(),
                    UNARY_FOR.as_secs()
                );
                self.state.lock().expect("batcher state").unary_until =
                    Some(Instant::now() + UNARY_FOR);
                // The batch's calls were never run. Their requests went into
                // the batch (kept, each would cost a copy on every call), so
                // they fail UNAVAILABLE and their steps retry, alone now,
                // with the same request IDs.
                let status = Status::unavailable(format!(
                    "the service has no batch method; the call is retried alone ({})",
                    status.message()
                ));
                fail_all(replies, status);
            }
            Err(status) => {
                fail_all(replies, batch_failure(status));
            }
        }
    }
}

/// The calls of `batch` still worth sending: their caller waits, and at
/// least [`MIN_BUDGET`] of their deadline is left. The others hear
/// DEADLINE_EXCEEDED, as a call alone would from `DeadlineCap` (a stream it
/// would reset). With the latest deadline of those kept, if any.
fn still_due<M: Method>(batch: Vec<Waiting<M>>) -> (Vec<Waiting<M>>, Option<Instant>) {
    let now = Instant::now();
    let mut due = Vec::with_capacity(batch.len());
    for waiting in batch {
        if waiting.reply.is_closed() {
            // Its caller gave up (its deadline, or its saga stopped).
            continue;
        }
        if waiting.deadline.saturating_duration_since(now) < MIN_BUDGET {
            let _ = waiting.reply.send(Err(Status::deadline_exceeded(
                "too little of the call's deadline was left to send it",
            )));
            continue;
        }
        due.push(waiting);
    }
    let latest = due.iter().map(|waiting| waiting.deadline).max();
    (due, latest)
}

/// Answers every call of a batch with `status`.
fn fail_all<R>(replies: Vec<oneshot::Sender<Result<R, Status>>>, status: Status) {
    for reply in replies {
        let _ = reply.send(Err(status.clone()));
    }
}

/// What a call hears when its whole batch failed. A refusal of the batch's
/// shape (INVALID_ARGUMENT: too many items) says nothing of the call
/// itself, so it must not reach the step as a definite refusal: it becomes
/// INTERNAL, an unknown outcome, retried. Other codes are the call's own as
/// they would be alone (the connection, the key, the deadline, overload).
fn batch_failure(status: Status) -> Status {
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => Status::internal(format!(
            "the service refused the batch that carried the call: {}",
            status.message()
        )),
        _ => status,
    }
}

#[cfg(test)]
mod tests;
