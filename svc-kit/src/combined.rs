//! Many requests' effects in one statement, on PostgreSQL's shared
//! transaction.
//!
//! On the shared transaction ([`crate::shared_transaction`]) each request
//! took a turn of its own: one statement, one round trip, one wake-up of
//! the server's backend and of the request's task. The statements are tiny
//! (a row taken, a row or two inserted), so the server spent more of its
//! CPU on receiving, starting and answering them than on their rows
//! (docs/benchmarks.md). The requests of a batch RPC arrive together; here
//! those of one method that came in the same moment go in one turn, as one
//! statement the service writes for many ([`Combine`]), their parameters
//! as one JSON array.
//!
//! The rules:
//! - The statement writes each request whole (its effect and its claim
//!   with its reply) or nothing of it, and says which it wrote. A written
//!   request's answer holds once its batch commits, as a turn's would.
//! - A request it did not write goes on as it would have alone, on a turn
//!   of its own: a refusal, a repeat or anything the statement does not
//!   handle is answered there, precisely. The statement may leave out
//!   whatever it cannot settle simply (the second request of an order in
//!   the same batch, a hot row's last units): it costs only the round trip
//!   it did not save.
//! - A statement that fails (a race with another connection, its writes
//!   failing whole) writes nothing, and each of its requests goes on alone.
//! - Only the items of a batch RPC of two or more are offered
//!   ([`crate::batch::items_in_batch`]): a call alone goes on at once, with
//!   nothing added to its path, and a request alone in its service commits
//!   with its one statement
//!   ([`crate::shared_transaction::SharedTransaction::run_alone`]). An item
//!   alone in its moment all the same goes on alone too.

use std::sync::{Arc, Mutex};

pub use futures::future::BoxFuture;
use serde::Serialize;
use sqlx::{AnyConnection, Row, any::AnyRow};
use tokio::sync::oneshot;

use crate::shared_transaction::{Guard, SharedTransaction, TurnResult};

/// Writes many requests of one method in one statement.
pub trait Combine: Send + Sync + 'static {
    /// One request: its parameters, its claim and its reply.
    type Item: Send + Sync + 'static;
    /// What a written request learns from the statement (what its reply
    /// needs and only the statement knows, if anything).
    type Written: Send + 'static;

    /// Writes each of `items` whole, or nothing of it, in one statement:
    /// for each, in order, what it learned if it was written.
    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        items: &'a [Self::Item],
    ) -> BoxFuture<'a, Result<Vec<Option<Self::Written>>, sqlx::Error>>;
}

/// What became of an offered request.
pub enum Offered<W> {
    /// Written, and its batch committed.
    Written(W),
    /// Not written: it goes on alone.
    Alone,
    /// Its batch did not commit (or never opened): what a turn of its own
    /// would have answered (UNAVAILABLE; a retry runs it again, or replays
    /// it if the commit did happen after all).
    Failed(tonic::Status),
}

/// `items` as the statement's JSON array, each object with its place in
/// the batch as `n`, which the statement returns for each written item.
pub fn numbered_json<T: Serialize>(items: &[T]) -> String {
    #[derive(Serialize)]
    struct Numbered<'a, T> {
        n: usize,
        #[serde(flatten)]
        item: &'a T,
    }
    let numbered: Vec<_> = items
        .iter()
        .enumerate()
        .map(|(n, item)| Numbered { n, item })
        .collect();
    serde_json::to_string(&numbered).expect("a combined statement's items serialize")
}

/// For each of `len` items, what `learned` read from the row the statement
/// returned for it (by its `n`, see [`numbered_json`]), if any.
pub fn written_by_number<W>(
    rows: Vec<AnyRow>,
    len: usize,
    learned: impl Fn(&AnyRow) -> Result<W, sqlx::Error>,
) -> Result<Vec<Option<W>>, sqlx::Error> {
    let mut written: Vec<Option<W>> = std::iter::repeat_with(|| None).take(len).collect();
    for row in rows {
        let n: i64 = row.try_get("n")?;
        let slot = usize::try_from(n)
            .ok()
            .and_then(|n| written.get_mut(n))
            .ok_or_else(|| {
                sqlx::Error::Protocol(format!("a combined statement returned item {n} of {len}"))
            })?;
        *slot = Some(learned(&row)?);
    }
    Ok(written)
}

/// The requests of one method offered for combining, and their groups.
pub struct Combiner<C: Combine> {
    inner: Arc<Inner<C>>,
}

impl<C: Combine> Clone for Combiner<C> {
    fn clone(&self) -> Self {
        Combiner {
            inner: self.inner.clone(),
        }
    }
}

type Reply<W> = oneshot::Sender<Offered<W>>;

/// An offered request and where its answer goes.
type Offer<C> = (<C as Combine>::Item, Reply<<C as Combine>::Written>);

struct Inner<C: Combine> {
    combine: C,
    /// Offered and not yet taken by a group.
    waiting: Mutex<Vec<Offer<C>>>,
}

impl<C: Combine> Combiner<C> {
    pub fn new(combine: C) -> Self {
        Combiner {
            inner: Arc::new(Inner {
                combine,
                waiting: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Offers `item` for the next combined statement on `shared`. Only the
    /// items of a batch RPC of two or more are taken: a call alone goes on
    /// alone at once, with no task or wait added to its path.
    pub async fn offer(&self, shared: &SharedTransaction, item: C::Item) -> Offered<C::Written> {
        if crate::batch::items_in_batch() < 2 {
            return Offered::Alone;
        }
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut waiting = self.inner.waiting.lock().expect("combiner queue");
            waiting.push((item, reply));
            waiting.len() == 1
        };
        if first {
            tokio::spawn(run_group(self.inner.clone(), shared.clone()));
        }
        // Dropped unanswered only if the group's task panicked: nothing of
        // it committed then, and the request goes on alone.
        answer.await.unwrap_or(Offered::Alone)
    }
}

/// One group: the requests offered in the same moment as the one that
/// started it, in one turn.
async fn run_group<C: Combine>(inner: Arc<Inner<C>>, shared: SharedTransaction) {
    // The requests of one batch RPC are offered one after the other in the
    // same poll: to the back of the scheduler's queue once, so that they
    // are all here.
    tokio::task::yield_now().await;
    let group = std::mem::take(&mut *inner.waiting.lock().expect("combiner queue"));
    if group.len() < 2 {
        for (_, reply) in group {
            let _ = reply.send(Offered::Alone);
        }
        return;
    }
    let (items, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
    let combine = &inner.combine;
    let outcome = shared
        .run(Guard::Redo, async |conn: &mut AnyConnection| {
            Ok(match combine.apply(conn, &items).await {
                Ok(written) if written.iter().any(Option::is_some) => {
                    TurnResult::Written(Some(written))
                }
                Ok(written) => TurnResult::Untouched(Some(written)),
                // It wrote nothing, but on PostgreSQL a failed statement
                // aborts the transaction: the batch is rolled back (its
                // other requests run again), and these go on alone.
                Err(err) => {
                    tracing::debug!(error = %err, "a combined statement failed; its requests go on alone");
                    TurnResult::Nothing(None)
                }
            })
        })
        .await;
    match outcome {
        Ok(Some(written)) if written.len() == replies.len() => {
            let count = written.iter().filter(|w| w.is_some()).count();
            shared.count_combined(count as u64);
            for (reply, written) in replies.into_iter().zip(written) {
                let _ = reply.send(match written {
                    Some(written) => Offered::Written(written),
                    None => Offered::Alone,
                });
            }
        }
        Ok(Some(written)) => {
            // A bug of the statement's: said loudly. What it wrote cannot
            // be told apart, so none of it is acknowledged here; each
            // request's turn of its own finds its claim if it was written.
            tracing::error!(
                items = replies.len(),
                results = written.len(),
                "a combined statement answered for another number of requests"
            );
            fail_all(replies, || Offered::Alone);
        }
        Ok(None) => fail_all(replies, || Offered::Alone),
        // The batch did not commit (or never opened): what each request's
        // own turn would have heard.
        Err(err) => {
            let status = tonic::Status::from(err);
            fail_all(replies, || Offered::Failed(status.clone()));
        }
    }
}

fn fail_all<W>(replies: Vec<Reply<W>>, answer: impl Fn() -> Offered<W>) {
    for reply in replies {
        let _ = reply.send(answer());
    }
}
