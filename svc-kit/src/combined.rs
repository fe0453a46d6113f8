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
//! - A request it did not write goes on on its own, as it would have
//!   without the combiner: a refusal, a repeat or anything the statement
//!   does not handle is answered there, precisely. The statement may leave
//!   out whatever it cannot settle simply (the second request of an order
//!   in the same batch, a hot row's last units): it costs the round trip it
//!   did not save and, when the statement wrote others, the wait for their
//!   commit (those it left out hear of it then, never while the statement
//!   may still run again).
//! - A statement that fails (a race with another connection, its writes
//!   failing whole) writes nothing, and each of its requests goes on on its
//!   own (logged as a warning: a statement that always failed would cost a
//!   batch's rollback every time, with nothing else to show for it).
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
    /// Not written: it goes on on its own, as it would have without the
    /// combiner (a turn of its own, or its lone statement).
    NotWritten,
    /// Written, but its batch did not commit (or its outcome is unknown):
    /// what a turn of its own would have answered (UNAVAILABLE; a retry
    /// runs it again, or replays it if the commit did happen after all).
    Failed(tonic::Status),
}

/// `items` as the statement's JSON array, each object with its place in
/// the batch as `n`, which the statement returns for each written item.
fn numbered_json<T: Serialize>(items: &[T]) -> String {
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
fn written_by_number<W>(
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

/// Runs `sql` (whose `$1` is the items' JSON, [`numbered_json`]) and reads
/// what each written item learned from its row ([`written_by_number`]):
/// a [`Combine::apply`] in one call.
pub async fn apply_numbered<T: Serialize, W>(
    conn: &mut AnyConnection,
    sql: &'static str,
    items: &[T],
    learned: impl Fn(&AnyRow) -> Result<W, sqlx::Error>,
) -> Result<Vec<Option<W>>, sqlx::Error> {
    let rows = sqlx::query(sql)
        .bind(numbered_json(items))
        .fetch_all(&mut *conn)
        .await?;
    written_by_number(rows, items.len(), learned)
}

/// The CTEs `counted` and `fresh`: the items of `i` (a CTE of the
/// statement's JSON, with `order_id` and `request_id`) that a combined
/// statement may write, those whose order and request appear once in the
/// batch, whose request was never claimed, and whose order has no row in
/// `$orders` yet (the order's row, or a compensation's tombstone). Each
/// lookup is a lateral subquery by its key alone: a probe of the key's
/// index per item, whatever the planner made of the tables' sizes when it
/// planned (a join of the JSON with a growing table, planned while the
/// table was small and kept by the connection, scanned the table whole for
/// every item: 2.4 ms a statement of 12 after 4,000 orders).
#[macro_export]
macro_rules! fresh_items {
    ($orders:literal) => {
        concat!(
            "counted AS ( \
               SELECT i.*, count(*) OVER (PARTITION BY order_id) AS of_order, \
                 count(*) OVER (PARTITION BY request_id) AS of_request FROM i), \
             fresh AS ( \
               SELECT c.* FROM counted c \
                 LEFT JOIN LATERAL (SELECT 1 AS found FROM idempotency x \
                   WHERE x.request_id = c.request_id LIMIT 1) x ON true \
                 LEFT JOIN LATERAL (SELECT 1 AS found FROM ",
            $orders,
            " o WHERE o.order_id = c.order_id LIMIT 1) o ON true \
               WHERE c.of_order = 1 AND c.of_request = 1 AND x.found IS NULL AND o.found IS NULL)"
        )
    };
}

/// The requests of one method offered for combining on one shared
/// transaction, and their groups.
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
    shared: SharedTransaction,
    /// Offered and not yet taken by a group.
    waiting: Mutex<Vec<Offer<C>>>,
}

impl<C: Combine> Combiner<C> {
    /// Combines on `shared` with `combine`'s statement.
    pub fn new(shared: SharedTransaction, combine: C) -> Self {
        Combiner {
            inner: Arc::new(Inner {
                combine,
                shared,
                waiting: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Whether a request now is worth offering: it is an item of a batch
    /// RPC of two or more ([`crate::batch::items_in_batch`]). A call alone
    /// goes on at once, having built nothing for the combiner.
    pub fn takes_offers_now(&self) -> bool {
        crate::batch::items_in_batch() >= 2
    }

    /// Offers `item` for the next combined statement.
    pub async fn offer(&self, item: C::Item) -> Offered<C::Written> {
        if !self.takes_offers_now() {
            return Offered::NotWritten;
        }
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut waiting = lock(&self.inner.waiting);
            waiting.push((item, reply));
            waiting.len() == 1
        };
        if first {
            // This request leads the group, in its own future: it steps
            // back once, and the batch RPC's other items, polled after it
            // in the same pass of the same task, are offered meanwhile.
            // (Run as a task of its own, the group was at times taken up
            // by the other worker before the batch's last items were
            // offered, and split.)
            let forming = Forming::<C>(Some(&self.inner.waiting));
            tokio::task::yield_now().await;
            run_group(&self.inner, forming.take()).await;
        }
        // Dropped unanswered only if the leader's future was dropped (its
        // batch RPC's client left) or panicked. If the statement wrote this
        // request and its batch commits all the same, the request's own
        // turn finds its claim and replays it.
        answer.await.unwrap_or(Offered::NotWritten)
    }
}

/// The group a leader steps back for, not taken yet. A leader dropped
/// meanwhile (its batch RPC's client left) must not leave it in the queue:
/// nobody would answer it, and every later request, finding the queue not
/// empty, would count itself a follower and wait for a leader that never
/// comes (the service's batched calls hung until it restarted). Dropped
/// untaken, it answers the group NotWritten: each request goes on on its
/// own, or is gone with its client.
struct Forming<'a, C: Combine>(Option<&'a Mutex<Vec<Offer<C>>>>);

impl<C: Combine> Forming<'_, C> {
    /// The requests offered until now, for the leader to run.
    fn take(mut self) -> Vec<Offer<C>> {
        let waiting = self.0.take().expect("a group is taken once");
        std::mem::take(&mut *lock(waiting))
    }
}

impl<C: Combine> Drop for Forming<'_, C> {
    fn drop(&mut self) {
        if let Some(waiting) = self.0.take() {
            let group = std::mem::take(&mut *lock(waiting));
            tell_all(group.into_iter().map(|(_, reply)| reply), || {
                Offered::NotWritten
            });
        }
    }
}

/// The queue, even if a panic poisoned its lock: it holds no invariant a
/// panic could break halfway (a push or a take), and it is also taken in a
/// drop, where a second panic would abort the process.
fn lock<T>(queue: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One group, `group` (the requests offered until it was taken), in one turn.
async fn run_group<C: Combine>(inner: &Inner<C>, group: Vec<Offer<C>>) {
    if group.len() < 2 {
        tell_all(group.into_iter().map(|(_, reply)| reply), || {
            Offered::NotWritten
        });
        return;
    }
    let (items, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
    let combine = &inner.combine;
    // Which requests the last run of the statement wrote (it runs again if
    // its batch is redone): those are the ones whose outcome a failed
    // commit leaves unknown.
    let last_written = Mutex::new(vec![false; items.len()]);
    let outcome = inner
        .shared
        .run(Guard::Redo, async |conn: &mut AnyConnection| {
            let result = combine.apply(conn, &items).await;
            *last_written.lock().expect("written flags") = match &result {
                Ok(written) if written.len() == items.len() => {
                    written.iter().map(Option::is_some).collect()
                }
                // Not told apart: each one's own turn finds its claim.
                Ok(_) => vec![true; items.len()],
                Err(_) => vec![false; items.len()],
            };
            Ok(match result {
                Ok(written) if written.iter().any(Option::is_some) => {
                    TurnResult::Written(Some(written))
                }
                Ok(written) => TurnResult::Untouched(Some(written)),
                // It wrote nothing, but on PostgreSQL a failed statement
                // aborts the transaction: it is rolled back (to the turn's
                // savepoint if it has one, else with its batch, whose other
                // requests run again), and these go on on their own.
                Err(err) => {
                    tracing::warn!(error = %err, "a combined statement failed; its requests go on on their own");
                    TurnResult::Nothing(None)
                }
            })
        })
        .await;
    match outcome {
        Ok(Some(written)) if written.len() == replies.len() => {
            let count = written.iter().filter(|w| w.is_some()).count();
            inner.shared.count_combined(count as u64);
            for (reply, written) in replies.into_iter().zip(written) {
                let _ = reply.send(match written {
                    Some(written) => Offered::Written(written),
                    None => Offered::NotWritten,
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
            tell_all(replies, || Offered::NotWritten);
        }
        Ok(None) => tell_all(replies, || Offered::NotWritten),
        // The batch did not commit (or never opened): a request the
        // statement wrote hears what its own turn would have heard; one it
        // did not write goes on on its own.
        Err(err) => {
            let status = tonic::Status::from(err);
            let written = last_written.into_inner().expect("written flags");
            for (reply, written) in replies.into_iter().zip(written) {
                let _ = reply.send(match written {
                    true => Offered::Failed(status.clone()),
                    false => Offered::NotWritten,
                });
            }
        }
    }
}

/// Sends each of `replies` what `answer` makes.
fn tell_all<W>(replies: impl IntoIterator<Item = Reply<W>>, answer: impl Fn() -> Offered<W>) {
    for reply in replies {
        let _ = reply.send(answer());
    }
}
