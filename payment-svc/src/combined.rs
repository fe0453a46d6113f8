//! Many `Charge` requests in one statement, on PostgreSQL's shared
//! transaction ([`svc_kit::combined`]): the debits of the batch's accounts,
//! the orders' charges, and their requests' claims.
//!
//! A request is written only if its order has no charge row yet (neither a
//! charge nor a refund's tombstone), its request was never claimed,
//! neither its order nor its request appears twice in the batch, its
//! account is in its currency, and the funds are there. The charges of one
//! account are debited in the batch's order: each request is written if
//! the amounts of the requests before it and its own fit in the balance;
//! once one does not fit, none after it on that account is written. Any
//! other goes on alone, where [`crate::charges::charge`] answers it (perhaps
//! with what is left, or with the refusal): an account's written requests
//! then come first, as if they had come first.
//!
//! The account's row is updated once per account with the sum of its
//! written amounts, and only if the balance still covers it then (the row
//! may have moved since the statement's snapshot, in another connection's
//! commit): otherwise none of that account's requests is written. No
//! account is ever overdrawn. Each written request's reply carries the
//! balance after its own debit, as if the debits had come one by one in the
//! batch's order: the statement appends it to the stored reply, as
//! [`crate::charges`]' one-request statement does.

use ordersaga_proto::payment::v1::ChargeResponse;
use serde::Serialize;
use sqlx::{AnyConnection, Row};
use svc_kit::{
    combined::{BoxFuture, Combine, apply_numbered},
    idempotency::ClaimRow,
};

/// One request: the charge it would insert, and its claim with its reply
/// but the balance (at 0, which protobuf leaves out; the statement appends
/// the balance's field).
#[derive(Serialize)]
pub struct Charge {
    pub order_id: String,
    pub payment_id: String,
    pub customer_id: String,
    pub amount_cents: i64,
    pub currency: String,
    #[serde(flatten)]
    pub claim: ClaimRow,
}

impl Charge {
    /// The charge of `reply` (its balance at 0) for `order_id` of
    /// `customer_id`, by the request of `claim`.
    pub fn new(order_id: &str, customer_id: &str, reply: &ChargeResponse, claim: ClaimRow) -> Self {
        debug_assert_eq!(reply.balance_cents, 0, "the statement appends the balance");
        Charge {
            order_id: order_id.to_owned(),
            payment_id: reply.payment_id.clone(),
            customer_id: customer_id.to_owned(),
            amount_cents: reply.amount_cents,
            currency: reply.currency.clone(),
            claim,
        }
    }
}

/// The update of the hot rows keeps `= ANY` of the batch's keys, which
/// lets the planner reach them by key however it joins.
const CHARGE_MANY: &str = concat!(
    "WITH i AS ( \
       SELECT * FROM jsonb_to_recordset($1::jsonb) AS i(n bigint, order_id text, payment_id text, \
         customer_id text, amount_cents bigint, currency text, \
         request_id text, method text, fingerprint text, at_ms bigint, reply text)), \
     ",
    svc_kit::fresh_items!("charges"),
    ", \
     funded AS ( \
       SELECT f.*, a.balance_cents, \
         (sum(f.amount_cents) OVER (PARTITION BY f.customer_id ORDER BY f.n))::bigint AS amounts_so_far \
       FROM fresh f \
         JOIN LATERAL (SELECT balance_cents FROM accounts a \
           WHERE a.customer_id = f.customer_id \
             AND a.currency = f.currency) a ON true), \
     fits AS (SELECT * FROM funded WHERE amounts_so_far <= balance_cents), \
     debit AS ( \
       UPDATE accounts a SET balance_cents = a.balance_cents - t.amounts, updated_at_ms = t.at_ms \
       FROM (SELECT customer_id, sum(amount_cents)::bigint AS amounts, max(currency) AS currency, \
               max(at_ms) AS at_ms FROM fits GROUP BY customer_id) t \
       WHERE a.customer_id = t.customer_id AND a.customer_id = ANY(ARRAY(SELECT customer_id FROM fits)) \
         AND a.currency = t.currency AND a.balance_cents >= t.amounts \
       RETURNING a.customer_id, a.balance_cents + t.amounts AS balance_before), \
     written AS ( \
       SELECT f.*, d.balance_before - f.amounts_so_far AS balance_after \
       FROM fits f JOIN debit d USING (customer_id)), \
     charge AS ( \
       INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
       SELECT order_id, payment_id, customer_id, amount_cents, currency, 'charged', at_ms, at_ms FROM written), \
     claim AS ( \
       INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
       SELECT request_id, method, decode(fingerprint, 'hex'), at_ms, 0, \
         decode(reply, 'hex') || CASE WHEN balance_after = 0 THEN ''::bytea \
           ELSE '\\x20'::bytea || protobuf_varint(balance_after) END \
       FROM written) \
     SELECT n, balance_after FROM written"
);

/// [`CHARGE_MANY`] for the payment service's combiner: each written
/// request learns the balance after its debit.
pub struct ChargeMany;

impl Combine for ChargeMany {
    type Item = Charge;
    type Written = i64;

    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        items: &'a [Charge],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, sqlx::Error>> {
        Box::pin(apply_numbered(conn, CHARGE_MANY, items, |row| {
            row.try_get("balance_after")
        }))
    }
}
