//! Many `ReserveStock` requests in one statement, on PostgreSQL's shared
//! transaction ([`svc_kit::combined`]): the stock taken for the batch's
//! orders, their reservations and lines, and their requests' claims.
//!
//! Only an order of one line priced by its caller is offered (the common
//! one; its reply is known before the statement). It is written only if
//! its order has no reservation row yet (neither a reservation nor a
//! release's tombstone), its request was never claimed, neither its order
//! nor its request appears twice in the batch, the product is at the price
//! the order expects, and the units fit. The units of one product are
//! taken in the batch's order: each request takes its units if those of
//! the requests before it and its own fit in what is available; once one
//! does not fit, none after it on that product is written. Any other goes
//! on alone, where [`crate::reservations::reserve_claiming`] answers it
//! (perhaps with the last units, or with the refusal): a product's
//! written requests then come first, as if they had come first.
//!
//! The product's row is updated once per product with the sum of its
//! written units, and only if they are still available then (the row may
//! have moved since the statement's snapshot, in another connection's
//! commit): otherwise none of that product's requests is written. Nothing
//! is ever oversold.

use ordersaga_proto::stock::v1::ReserveStockResponse;
use serde::Serialize;
use sqlx::AnyConnection;
use svc_kit::{
    combined::{BoxFuture, Combine, apply_numbered},
    idempotency::ClaimRow,
};

/// One request: its one line, the reservation it would insert, and its
/// claim with the reply that tells of it.
#[derive(Serialize)]
pub struct Reserve {
    pub order_id: String,
    pub reservation_id: String,
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
    pub currency: String,
    pub total_cents: i64,
    #[serde(flatten)]
    pub claim: ClaimRow,
}

impl Reserve {
    /// The reservation of `reply` (of one line) for `order_id`, by the
    /// request of `claim`.
    pub fn new(order_id: &str, reply: &ReserveStockResponse, claim: ClaimRow) -> Option<Self> {
        let [line] = reply.lines.as_slice() else {
            return None;
        };
        Some(Reserve {
            order_id: order_id.to_owned(),
            reservation_id: reply.reservation_id.clone(),
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents: line.unit_price_cents,
            currency: line.currency.clone(),
            total_cents: reply.total_cents,
            claim,
        })
    }
}

/// The update of the hot rows keeps `= ANY` of the batch's keys, which
/// lets the planner reach them by key however it joins.
const RESERVE_MANY: &str = concat!(
    "WITH i AS ( \
       SELECT * FROM jsonb_to_recordset($1::jsonb) AS i(n bigint, order_id text, reservation_id text, \
         sku text, quantity bigint, unit_price_cents bigint, currency text, total_cents bigint, \
         request_id text, method text, fingerprint text, at_ms bigint, reply text)), \
     ",
    svc_kit::fresh_items!("reservations"),
    ", \
     priced AS ( \
       SELECT f.*, p.available, \
         (sum(f.quantity) OVER (PARTITION BY f.sku ORDER BY f.n))::bigint AS units_so_far \
       FROM fresh f \
         JOIN LATERAL (SELECT available FROM products p \
           WHERE p.sku = f.sku \
             AND p.unit_price_cents = f.unit_price_cents AND p.currency = f.currency) p ON true), \
     fits AS (SELECT * FROM priced WHERE units_so_far <= available), \
     taken AS ( \
       UPDATE products p SET available = p.available - t.units, reserved = p.reserved + t.units, \
         updated_at_ms = t.at_ms \
       FROM (SELECT sku, sum(quantity)::bigint AS units, max(unit_price_cents) AS unit_price_cents, \
               max(currency) AS currency, max(at_ms) AS at_ms FROM fits GROUP BY sku) t \
       WHERE p.sku = t.sku AND p.sku = ANY(ARRAY(SELECT sku FROM fits)) AND p.available >= t.units \
         AND p.unit_price_cents = t.unit_price_cents AND p.currency = t.currency \
       RETURNING p.sku), \
     written AS (SELECT f.* FROM fits f JOIN taken USING (sku)), \
     reservation AS ( \
       INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
       SELECT order_id, reservation_id, 'reserved', total_cents, currency, at_ms, at_ms FROM written), \
     line AS ( \
       INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) \
       SELECT order_id, sku, quantity, unit_price_cents FROM written), \
     claim AS (",
    svc_kit::claims_of!("written"),
    ") \
     SELECT n FROM written"
);

/// [`RESERVE_MANY`] for the stock service's combiner.
pub struct ReserveMany;

impl Combine for ReserveMany {
    type Item = Reserve;
    type Written = ();

    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        items: &'a [Reserve],
    ) -> BoxFuture<'a, Result<Vec<Option<()>>, sqlx::Error>> {
        Box::pin(apply_numbered(conn, RESERVE_MANY, items, |_| Ok(())))
    }
}
