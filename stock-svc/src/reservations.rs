//! Reserving and releasing an order's stock: the saga step and its compensation.
//!
//! Each order has at most one row in `reservations`, and whichever of reserve or
//! release comes first inserts it. That insert-if-absent is what orders the two:
//! a release that finds no reservation leaves a 'released' tombstone, and a
//! reserve that finds the tombstone is refused. On PostgreSQL a concurrent second
//! insert waits on the primary key until the first commits, so the race where
//! the compensation overtakes the action has one outcome.

use ordersaga_proto::stock::v1::{
    ReleaseStockResponse, Reservation, ReservationStatus, ReserveStockResponse, ReservedLine,
};
use rusqlite::{OptionalExtension, params};
use sqlx::{AnyConnection, Row, any::AnyRow};
use svc_kit::{
    idempotency::{Claim, Claimed, Refusal},
    time::now_ms,
};
use uuid::Uuid;

use crate::error::StockError;

/// One validated order line.
#[derive(Clone)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
    /// The unit price and currency the caller priced the line at, if any.
    pub expected_price: Option<(i64, String)>,
}

impl Line {
    /// Refuses the line if the catalogue's price is not the one the order
    /// was priced at (read in the same statement that takes the stock).
    fn check_price(&self, unit_price_cents: i64, currency: &str) -> Result<(), StockError> {
        match &self.expected_price {
            Some((cents, expected)) if *cents != unit_price_cents || expected != currency => {
                Err(StockError::PriceChanged {
                    sku: self.sku.clone(),
                    expected_cents: *cents,
                    expected_currency: expected.clone(),
                    actual_cents: unit_price_cents,
                    actual_currency: currency.to_owned(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// With the total and currency when the caller priced every line (the
/// catalogue's prices are checked against them line by line), else 0 and ''
/// until [`SET_TOTAL`]. (SQLite reads `$N` as a name and numbers the names
/// in the order they first appear: they must appear in ascending order.)
const INSERT_RESERVATION: &str = "INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
     VALUES ($1, $2, 'reserved', $3, $4, $5, $5) ON CONFLICT (order_id) DO NOTHING";
const INSERT_LINE: &str = "INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) VALUES ($1, $2, $3, $4)";
const SET_TOTAL: &str =
    "UPDATE reservations SET total_cents = $1, currency = $2 WHERE order_id = $3";
/// The check and the decrement are one statement, so concurrent callers can
/// never oversell.
const TAKE_STOCK: &str = "UPDATE products SET available = available - $1, reserved = reserved + $1, updated_at_ms = $2 \
     WHERE sku = $3 AND available >= $1 RETURNING unit_price_cents, currency";
/// [`TAKE_STOCK`] and [`INSERT_LINE`] as one statement, for PostgreSQL (SQLite
/// has no data-modifying `WITH`): the line is recorded only if its stock was
/// taken, and a row comes back only then.
const TAKE_STOCK_AND_RECORD_LINE: &str = "WITH taken AS ( \
       UPDATE products SET available = available - $1, reserved = reserved + $1, updated_at_ms = $2 \
       WHERE sku = $3 AND available >= $1 RETURNING unit_price_cents, currency) \
     INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) \
     SELECT $4, $3, $1, unit_price_cents FROM taken \
     RETURNING unit_price_cents, (SELECT currency FROM taken) AS currency";
/// A priced one-line order on PostgreSQL's shared transaction, in one
/// statement: the stock taken, the reservation, the line recorded and the
/// request's claim with its reply (known beforehand: the caller priced the
/// line). It writes all of them or nothing, so a refusal needs no savepoint
/// to take back, and a request alone commits with it
/// ([`svc_kit::idempotency::Refusal::OneStatement`]): the stock is taken
/// only at the expected price, with enough available, no reservation of
/// the order and no claim of the request yet, and every part after it
/// happens only if the one before it did. Then it reads (as they stood
/// before it) what may have stood in the way, for the refusal.
///
/// A part after the stock taken fails only in a race with another
/// connection: the order's reservation, or the request's claim, inserted
/// and committed by a second process meanwhile. The inserts then fail the
/// statement whole (no `ON CONFLICT`): had they done nothing instead, the
/// stock would stay taken wherever no rollback follows.
const RESERVE_PRICED_LINE_CLAIMING: &str = "WITH taken AS ( \
       UPDATE products SET available = available - $6, reserved = reserved + $6, updated_at_ms = $5 \
       WHERE sku = $7 AND available >= $6 AND unit_price_cents = $13 AND currency = $4 \
         AND NOT EXISTS (SELECT 1 FROM reservations WHERE order_id = $1) \
         AND NOT EXISTS (SELECT 1 FROM idempotency WHERE request_id = $8) \
       RETURNING 1), \
     reservation AS ( \
       INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
       SELECT $1, $2, 'reserved', $3, $4, $5, $5 FROM taken RETURNING order_id), \
     line AS ( \
       INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) \
       SELECT order_id, $7, $6, $13 FROM reservation RETURNING 1), \
     claim AS ( \
       INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
       SELECT $8, $9, $10, $11, 0, $12 FROM reservation RETURNING 1) \
     SELECT (SELECT COUNT(*) FROM taken) AS taken, \
       r.reservation_id AS existing_id, r.status AS existing_status, \
       p.available, p.unit_price_cents, p.currency \
     FROM (SELECT 1) AS one \
       LEFT JOIN reservations r ON r.order_id = $1 \
       LEFT JOIN products p ON p.sku = $7";
const AVAILABLE: &str = "SELECT available FROM products WHERE sku = $1";
const EXISTING: &str = "SELECT reservation_id, status FROM reservations WHERE order_id = $1";
const TOMBSTONE: &str = "INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
     VALUES ($1, '', 'released', 0, '', $2, $2) ON CONFLICT (order_id) DO NOTHING";
const MARK_RELEASED: &str = "UPDATE reservations SET status = 'released', updated_at_ms = $1 WHERE order_id = $2 AND status = 'reserved'";
const RESERVED_LINES: &str =
    "SELECT sku, quantity FROM reservation_lines WHERE order_id = $1 ORDER BY sku";
const GIVE_BACK: &str = "UPDATE products SET available = available + $1, reserved = reserved - $1, updated_at_ms = $2 WHERE sku = $3";

/// [`release`] on PostgreSQL's shared transaction, in one statement with
/// the request's claim ([`svc_kit::undo`]): the order's tombstone when it
/// has no reservation, else its reservation marked released and its lines'
/// units given back.
const RELEASE_CLAIMING: &str = svc_kit::undo_claiming!(
    table: "reservations",
    tombstone: "(order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
       SELECT $1, '', 'released', 0, '', $2, $2",
    undo: "SET status = 'released', updated_at_ms = $2 WHERE order_id = $1 AND status = 'reserved'",
    // The products are locked in SKU order before any is updated (the
    // scalar subquery runs before the update's scan), as a reservation
    // takes them: two orders' writes on two connections cannot deadlock.
    then: "locked AS ( \
       SELECT sku FROM products WHERE sku IN ( \
         SELECT sku FROM reservation_lines WHERE order_id IN (SELECT order_id FROM undone)) \
       ORDER BY sku FOR UPDATE), \
     given_back AS ( \
       UPDATE products p SET available = p.available + l.quantity, reserved = p.reserved - l.quantity, updated_at_ms = $2 \
       FROM reservation_lines l \
       WHERE l.order_id IN (SELECT order_id FROM undone) AND p.sku = l.sku \
         AND (SELECT COUNT(*) FROM locked) >= 0 \
       RETURNING 1)",
);

/// What [`reserve_claiming`] leaves behind when it refuses on the shared
/// transaction: a priced one-line order goes as one statement that writes
/// all or nothing; any other may have written some of its lines.
pub fn refusal(lines: &[Line]) -> Refusal {
    match lines {
        [line] if line.expected_price.is_some() => Refusal::OneStatement,
        _ => Refusal::MayWrite,
    }
}

/// [`reserve`] given the request's claim (on PostgreSQL's shared
/// transaction): a priced one-line order, the common one, writes the claim
/// in its one statement; any other goes as [`reserve`] does and leaves the
/// claim to its caller.
pub async fn reserve_claiming(
    conn: &mut AnyConnection,
    order_id: &str,
    lines: Vec<Line>,
    claim: Option<&Claim<'_>>,
) -> Result<(ReserveStockResponse, Claimed), StockError> {
    match (claim, lines.as_slice()) {
        (Some(claim), [line]) if conn.backend_name() == "PostgreSQL" => {
            if let Some((unit_price_cents, currency)) = line.expected_price.clone() {
                return reserve_priced_line_claiming(
                    conn,
                    order_id,
                    line,
                    unit_price_cents,
                    currency,
                    claim,
                )
                .await;
            }
        }
        _ => {}
    }
    Ok((reserve(conn, order_id, lines).await?, Claimed::No))
}

/// [`RESERVE_PRICED_LINE_CLAIMING`]: the reply is the one [`reserve`] would
/// give, built before the statement so that the claim can carry it.
async fn reserve_priced_line_claiming(
    conn: &mut AnyConnection,
    order_id: &str,
    line: &Line,
    unit_price_cents: i64,
    currency: String,
    claim: &Claim<'_>,
) -> Result<(ReserveStockResponse, Claimed), StockError> {
    let now = now_ms();
    let reply = priced_reply(line, unit_price_cents, currency);
    let total_cents = reply.total_cents;
    let query = sqlx::query(RESERVE_PRICED_LINE_CLAIMING)
        .bind(order_id)
        .bind(&reply.reservation_id)
        .bind(total_cents)
        .bind(&reply.currency)
        .bind(now)
        .bind(line.quantity)
        .bind(&line.sku);
    let row = claim
        .bind(query, &reply)
        .bind(unit_price_cents)
        .fetch_one(&mut *conn)
        .await
        .map_err(|err| {
            svc_kit::Error::unless_raced(err, || {
                format!("order {order_id} was reserved by another connection meanwhile; try again")
            })
        })?;
    if row.try_get::<i64, _>("taken")? == 0 {
        // Nothing was written: say what stood in the way.
        return Err(why_not_reserved(order_id, line, &row)?);
    }
    Ok((reply, Claimed::Yes))
}

/// The reply to a reservation of one `line` at the price its caller
/// expects, with a new reservation ID: known before the stock is taken.
pub fn priced_reply(line: &Line, unit_price_cents: i64, currency: String) -> ReserveStockResponse {
    ReserveStockResponse {
        reservation_id: Uuid::new_v4().to_string(),
        lines: vec![ReservedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents,
            currency: currency.clone(),
        }],
        total_cents: unit_price_cents * line.quantity,
        currency,
    }
}

/// Why [`RESERVE_PRICED_LINE_CLAIMING`] took no stock, from what it read:
/// the order's reservation (or tombstone), then the stock, then the price.
fn why_not_reserved(order_id: &str, line: &Line, row: &AnyRow) -> Result<StockError, StockError> {
    if let Some(status) = row.try_get::<Option<String>, _>("existing_status")? {
        return Ok(already(order_id, row.try_get("existing_id")?, &status));
    }
    let available = row.try_get::<Option<i64>, _>("available")?;
    if available.is_none_or(|available| available < line.quantity) {
        return Ok(not_taken(line, available));
    }
    let unit_price_cents = row.try_get::<i64, _>("unit_price_cents")?;
    let currency = row.try_get::<String, _>("currency")?;
    line.check_price(unit_price_cents, &currency)?;
    // All was as needed when read: the product changed between the two
    // (another connection wrote it). Nothing was written; a retry decides.
    Ok(StockError::Kit(svc_kit::Error::StoreUnavailable(format!(
        "sku {:?} changed while order {order_id} was reserved; try again",
        line.sku
    ))))
}

/// Reserves every line or none: any refusal returns an error and the caller
/// rolls the transaction back.
pub async fn reserve(
    conn: &mut AnyConnection,
    order_id: &str,
    mut lines: Vec<Line>,
) -> Result<ReserveStockResponse, StockError> {
    let now = now_ms();
    let reservation_id = Uuid::new_v4().to_string();
    let priced = priced_total(&lines);
    let (total_cents, currency) = priced.clone().unwrap_or((0, String::new()));
    let inserted = sqlx::query(INSERT_RESERVATION)
        .bind(order_id)
        .bind(&reservation_id)
        .bind(total_cents)
        .bind(currency)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if inserted == 0 {
        return Err(existing_reservation(conn, order_id).await?);
    }

    // A fixed lock order (by SKU) keeps two multi-line orders from deadlocking.
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    let mut reserved = Vec::with_capacity(lines.len());
    let mut currency: Option<String> = None;
    let postgres = conn.backend_name() == "PostgreSQL";
    for line in &lines {
        let (unit_price_cents, line_currency) = match postgres {
            true => take_stock_recording_line(conn, order_id, line, now).await?,
            false => take_stock(conn, line, now).await?,
        };
        line.check_price(unit_price_cents, &line_currency)?;
        same_currency(&mut currency, &line_currency)?;
        if !postgres {
            sqlx::query(INSERT_LINE)
                .bind(order_id)
                .bind(&line.sku)
                .bind(line.quantity)
                .bind(unit_price_cents)
                .execute(&mut *conn)
                .await?;
        }
        reserved.push(ReservedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents,
            currency: line_currency,
        });
    }
    let currency = currency.unwrap_or_default();
    let total_cents = total(&reserved);
    // Priced lines all matched the catalogue, so the row already holds
    // this total: a round trip fewer.
    if priced != Some((total_cents, currency.clone())) {
        sqlx::query(SET_TOTAL)
            .bind(total_cents)
            .bind(&currency)
            .bind(order_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(ReserveStockResponse {
        reservation_id,
        lines: reserved,
        total_cents,
        currency,
    })
}

/// Refuses a line whose currency differs from the lines before it.
fn same_currency(currency: &mut Option<String>, line_currency: &str) -> Result<(), StockError> {
    match currency {
        Some(first) if first != line_currency => Err(StockError::MixedCurrencies {
            first: first.clone(),
            second: line_currency.to_owned(),
        }),
        _ => {
            *currency = Some(line_currency.to_owned());
            Ok(())
        }
    }
}

/// The order's total and currency as the caller priced it, if it priced
/// every line in one currency.
fn priced_total(lines: &[Line]) -> Option<(i64, String)> {
    let mut total = 0;
    let mut currency: Option<&str> = None;
    for line in lines {
        let (cents, line_currency) = line.expected_price.as_ref()?;
        if *currency.get_or_insert(line_currency) != line_currency {
            return None;
        }
        total += cents * line.quantity;
    }
    Some((total, currency?.to_owned()))
}

fn total(reserved: &[ReservedLine]) -> i64 {
    reserved
        .iter()
        .map(|l| l.unit_price_cents * l.quantity)
        .sum()
}

/// Why `line` could not be taken, given the units available (`None`: no such SKU).
fn not_taken(line: &Line, available: Option<i64>) -> StockError {
    match available {
        None => StockError::UnknownSku {
            sku: line.sku.clone(),
        },
        Some(available) => StockError::OutOfStock {
            sku: line.sku.clone(),
            available,
            requested: line.quantity,
        },
    }
}

/// Why a reservation row already exists for an order.
fn already(order_id: &str, reservation_id: String, status: &str) -> StockError {
    if status == "released" {
        StockError::AlreadyReleased {
            order_id: order_id.to_owned(),
        }
    } else {
        StockError::AlreadyReserved {
            order_id: order_id.to_owned(),
            reservation_id,
        }
    }
}

/// Moves `line.quantity` units from available to reserved, if that many are
/// available. The check and the decrement are one statement, so concurrent
/// callers can never oversell.
async fn take_stock(
    conn: &mut AnyConnection,
    line: &Line,
    now: i64,
) -> Result<(i64, String), StockError> {
    let row = sqlx::query(TAKE_STOCK)
        .bind(line.quantity)
        .bind(now)
        .bind(&line.sku)
        .fetch_optional(&mut *conn)
        .await?;
    price_or_why_not(conn, line, row).await
}

/// The price of a line whose stock was taken (its row), or, when no row
/// came back, why the stock could not be taken.
async fn price_or_why_not(
    conn: &mut AnyConnection,
    line: &Line,
    taken: Option<AnyRow>,
) -> Result<(i64, String), StockError> {
    if let Some(row) = taken {
        return Ok((row.try_get("unit_price_cents")?, row.try_get("currency")?));
    }
    Err(why_not_taken(conn, line).await?)
}

/// Why the stock of `line` could not be taken: read after the fact.
async fn why_not_taken(conn: &mut AnyConnection, line: &Line) -> Result<StockError, StockError> {
    let available: Option<i64> = sqlx::query_scalar(AVAILABLE)
        .bind(&line.sku)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(not_taken(line, available))
}

/// [`take_stock`] and the line's record in one round trip (PostgreSQL).
async fn take_stock_recording_line(
    conn: &mut AnyConnection,
    order_id: &str,
    line: &Line,
    now: i64,
) -> Result<(i64, String), StockError> {
    let row = sqlx::query(TAKE_STOCK_AND_RECORD_LINE)
        .bind(line.quantity)
        .bind(now)
        .bind(&line.sku)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    price_or_why_not(conn, line, row).await
}

/// Why a reservation row already exists for an order.
async fn existing_reservation(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<StockError, StockError> {
    let row = sqlx::query(EXISTING)
        .bind(order_id)
        .fetch_one(&mut *conn)
        .await?;
    let status: String = row.try_get("status")?;
    Ok(already(order_id, row.try_get("reservation_id")?, &status))
}

/// Returns an order's reserved stock. With nothing reserved it records a
/// tombstone and succeeds, so a late reserve is refused.
pub async fn release(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<ReleaseStockResponse, StockError> {
    let now = now_ms();
    let tombstone = sqlx::query(TOMBSTONE)
        .bind(order_id)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if tombstone == 1 {
        return Ok(ReleaseStockResponse {
            released_reservation: false,
        });
    }
    let flipped = sqlx::query(MARK_RELEASED)
        .bind(now)
        .bind(order_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if flipped == 0 {
        // Released before: nothing more to do.
        return Ok(ReleaseStockResponse {
            released_reservation: false,
        });
    }
    let lines = sqlx::query(RESERVED_LINES)
        .bind(order_id)
        .fetch_all(&mut *conn)
        .await?;
    for line in lines {
        let sku: String = line.try_get("sku")?;
        let quantity: i64 = line.try_get("quantity")?;
        sqlx::query(GIVE_BACK)
            .bind(quantity)
            .bind(now)
            .bind(&sku)
            .execute(&mut *conn)
            .await?;
    }
    Ok(ReleaseStockResponse {
        released_reservation: true,
    })
}

/// [`release`] given the request's claim: on PostgreSQL's shared
/// transaction, [`RELEASE_CLAIMING`]; elsewhere as [`release`] goes, the
/// claim left to its caller.
pub async fn release_claiming(
    conn: &mut AnyConnection,
    order_id: &str,
    claim: Option<&Claim<'_>>,
) -> Result<(ReleaseStockResponse, Claimed), StockError> {
    let Some(claim) = claim.filter(|_| conn.backend_name() == "PostgreSQL") else {
        return Ok((release(conn, order_id).await?, Claimed::No));
    };
    let released = ReleaseStockResponse {
        released_reservation: true,
    };
    let not_released = ReleaseStockResponse {
        released_reservation: false,
    };
    Ok(svc_kit::undo::run(
        conn,
        RELEASE_CLAIMING,
        "release",
        order_id,
        claim,
        released,
        not_released,
    )
    .await?)
}

/// [`reserve`] on the store's batch writer (a SQLite file): the same statements.
pub fn reserve_sqlite(
    conn: &rusqlite::Connection,
    order_id: &str,
    mut lines: Vec<Line>,
) -> Result<ReserveStockResponse, StockError> {
    let now = now_ms();
    let reservation_id = Uuid::new_v4().to_string();
    let inserted = conn.prepare_cached(INSERT_RESERVATION)?.execute(params![
        order_id,
        reservation_id,
        0,
        "",
        now
    ])?;
    if inserted == 0 {
        let (reservation_id, status): (String, String) = conn
            .prepare_cached(EXISTING)?
            .query_row(params![order_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        return Err(already(order_id, reservation_id, &status));
    }
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    let mut reserved = Vec::with_capacity(lines.len());
    let mut currency: Option<String> = None;
    for line in &lines {
        let taken: Option<(i64, String)> = conn
            .prepare_cached(TAKE_STOCK)?
            .query_row(params![line.quantity, now, line.sku], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((unit_price_cents, line_currency)) = taken else {
            let available: Option<i64> = conn
                .prepare_cached(AVAILABLE)?
                .query_row(params![line.sku], |r| r.get(0))
                .optional()?;
            return Err(not_taken(line, available));
        };
        line.check_price(unit_price_cents, &line_currency)?;
        same_currency(&mut currency, &line_currency)?;
        conn.prepare_cached(INSERT_LINE)?.execute(params![
            order_id,
            line.sku,
            line.quantity,
            unit_price_cents
        ])?;
        reserved.push(ReservedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents,
            currency: line_currency,
        });
    }
    let currency = currency.unwrap_or_default();
    let total_cents = total(&reserved);
    conn.prepare_cached(SET_TOTAL)?
        .execute(params![total_cents, currency, order_id])?;
    Ok(ReserveStockResponse {
        reservation_id,
        lines: reserved,
        total_cents,
        currency,
    })
}

/// [`release`] on the store's batch writer (a SQLite file): the same statements.
pub fn release_sqlite(
    conn: &rusqlite::Connection,
    order_id: &str,
) -> Result<ReleaseStockResponse, StockError> {
    let now = now_ms();
    let nothing = ReleaseStockResponse {
        released_reservation: false,
    };
    if conn
        .prepare_cached(TOMBSTONE)?
        .execute(params![order_id, now])?
        == 1
    {
        return Ok(nothing);
    }
    if conn
        .prepare_cached(MARK_RELEASED)?
        .execute(params![now, order_id])?
        == 0
    {
        // Released before: nothing more to do.
        return Ok(nothing);
    }
    let lines: Vec<(String, i64)> = conn
        .prepare_cached(RESERVED_LINES)?
        .query_map(params![order_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut give_back = conn.prepare_cached(GIVE_BACK)?;
    for (sku, quantity) in lines {
        give_back.execute(params![quantity, now, sku])?;
    }
    Ok(ReleaseStockResponse {
        released_reservation: true,
    })
}

const RESERVATION: &str = "SELECT reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms \
     FROM reservations WHERE order_id = $1";
const RESERVATION_LINES: &str = "SELECT r.sku, r.quantity, r.unit_price_cents, p.currency \
     FROM reservation_lines r JOIN products p ON p.sku = r.sku WHERE r.order_id = $1 ORDER BY r.sku";

/// An order's reservation with its lines, for audits; `None` when the order
/// never reached this service.
pub async fn get(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<Reservation>, sqlx::Error> {
    let Some(row) = sqlx::query(RESERVATION)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    let lines = sqlx::query(RESERVATION_LINES)
        .bind(order_id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|line| {
            Ok(ReservedLine {
                sku: line.try_get("sku")?,
                quantity: line.try_get("quantity")?,
                unit_price_cents: line.try_get("unit_price_cents")?,
                currency: line.try_get("currency")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(Some(Reservation {
        reservation_id: row.try_get("reservation_id")?,
        order_id: order_id.to_owned(),
        status: match status.as_str() {
            "reserved" => ReservationStatus::Reserved,
            _ => ReservationStatus::Released,
        } as i32,
        lines,
        total_cents: row.try_get("total_cents")?,
        currency: row.try_get("currency")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    }))
}
