//! A compensation (a release, a cancel) as one statement with its request's
//! claim, on PostgreSQL's shared transaction.
//!
//! Each undoes an order's effect if the order has one, and otherwise leaves
//! a tombstone that refuses the effect if it arrives late. Statement by
//! statement (the tombstone, the undo, its follow-ups, then the claim, in a
//! savepoint) a compensation took four to six round trips; in one statement
//! it takes one, and a request alone in its service commits with it
//! ([`crate::idempotency::Refusal::OneStatement`]). Compensations come in
//! one at a time (they are unary calls), so the combiner
//! ([`crate::combined`]) does not see them.
//!
//! The statement ([`undo_claiming!`]) writes all of its parts or nothing:
//! - nothing when the request was claimed before (its first answer stands);
//! - nothing when what it saw does not explain what it did. Its snapshot
//!   may predate the order's effect that another connection commits while
//!   the tombstone waits on the order's key: the tombstone then does
//!   nothing, and the undo, which did not see that row, undoes nothing.
//!   Answered "nothing to undo", the effect would stay for good, so the
//!   statement writes nothing and runs again, and sees it;
//! - a claim of the same request committed meanwhile by another connection
//!   fails it whole.

use prost::Message;
use sqlx::{AnyConnection, Row};

use crate::{
    Error,
    idempotency::{Claim, Claimed},
    time::now_ms,
};

/// A compensation's statement on `table` (keyed by `order_id`): the
/// order's tombstone (`tombstone`: its columns and a `SELECT` of their
/// values) when the order has no row in the statement's snapshot, else
/// `undo` (`SET … WHERE …` of an `UPDATE`, returning the order's row only
/// if it undid the effect); then `then` (optional: common table
/// expressions that follow the undo up, reading `undone(order_id)`, e.g.
/// the stock given back); then the claim with its reply. The macro adds
/// the guards that make it write nothing for a request claimed before.
/// Its parameters: `$1` the order, `$2` the time, `$3`–`$7` the claim with
/// the reply when something was undone ([`Claim::bind`]), `$8` the reply
/// when nothing was. [`run`] runs it.
#[macro_export]
macro_rules! undo_claiming {
    (table: $table:literal, tombstone: $tombstone:literal, undo: $undo:literal $(, then: $then:literal)? $(,)?) => {
        concat!(
            "WITH fresh AS ( \
               SELECT NOT EXISTS (SELECT 1 FROM idempotency WHERE request_id = $3) AS ok), \
             existing AS (SELECT 1 FROM ", $table, " WHERE order_id = $1), \
             tombstone AS (INSERT INTO ", $table, " ", $tombstone,
            " FROM fresh WHERE ok AND NOT EXISTS (SELECT 1 FROM existing) \
               ON CONFLICT (order_id) DO NOTHING RETURNING 1), \
             undone AS (UPDATE ", $table, " ", $undo,
            " AND (SELECT ok FROM fresh) RETURNING order_id), ",
            $($then, ", ",)?
            "claim AS ( \
               INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
               SELECT $3, $4, $5, $6, 0, CASE WHEN EXISTS (SELECT 1 FROM undone) THEN $7 ELSE $8 END \
               FROM fresh WHERE ok AND (EXISTS (SELECT 1 FROM existing) OR EXISTS (SELECT 1 FROM tombstone)) \
               RETURNING 1) \
             SELECT (SELECT ok FROM fresh) AS fresh, (SELECT COUNT(*) FROM undone) AS undone, \
               (SELECT COUNT(*) FROM claim) AS claimed"
        )
    };
}

/// How many times [`run`] runs its statement while another connection's
/// writes of the order keep it from explaining what it did.
const RUNS: usize = 3;

/// Runs `sql` ([`undo_claiming!`]) for `order_id` with `claim`: the reply
/// is `undone` if it undid the order's effect, `nothing_to_undo` if not.
/// `what` names the compensation in errors ("release").
///
/// A request claimed before wrote nothing and says so
/// ([`Claimed::Before`]): its first answer is read. A statement that wrote
/// nothing because another connection wrote the order meanwhile runs
/// again, and sees that write (each statement takes a new snapshot, in the
/// shared transaction too).
pub async fn run<Resp: Message>(
    conn: &mut AnyConnection,
    sql: &'static str,
    what: &str,
    order_id: &str,
    claim: &Claim<'_>,
    undone: Resp,
    nothing_to_undo: Resp,
) -> Result<(Resp, Claimed), Error> {
    let nothing = nothing_to_undo.encode_to_vec();
    for _ in 0..RUNS {
        let query = sqlx::query(sql).bind(order_id).bind(now_ms());
        let row = claim
            .bind(query, &undone)
            .bind(nothing.clone())
            .fetch_one(&mut *conn)
            .await
            .map_err(|err| {
                Error::unless_raced(err, || {
                    format!(
                        "{what} of order {order_id} was answered by another connection meanwhile"
                    )
                })
            })?;
        if !row.try_get::<bool, _>("fresh")? {
            return Ok((nothing_to_undo, Claimed::Before));
        }
        if row.try_get::<i64, _>("claimed")? == 1 {
            return Ok(match row.try_get::<i64, _>("undone")? {
                0 => (nothing_to_undo, Claimed::Yes),
                _ => (undone, Claimed::Yes),
            });
        }
    }
    Err(Error::StoreUnavailable(format!(
        "order {order_id} kept being written by another connection during its {what}; try again"
    )))
}
