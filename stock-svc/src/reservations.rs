//! Reserving and releasing an order's stock: the saga step and its compensation.
//!
//! Each order has at most one row in `reservations`, and whichever of reserve or
//! release comes first inserts it. That insert-if-absent is what orders the two:
//! a release that finds no reservation leaves a 'released' tombstone, and a
//! reserve that finds the tombstone is refused. On PostgreSQL a concurrent second
//! insert waits on the primary key until the first commits, so the race where
//! the compensation overtakes the action has one outcome.

use ordersaga_proto::stock::v1::{ReleaseStockResponse, ReserveStockResponse, ReservedLine};
use sqlx::{AnyConnection, Row};
use svc_kit::time::now_ms;
use uuid::Uuid;

use crate::error::StockError;

/// One validated order line.
pub struct Line {
    pub sku: String,
    pub quantity: i64,
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
    let inserted = sqlx::query(
        "INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
         VALUES ($1, $2, 'reserved', 0, '', $3, $3) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(&reservation_id)
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
    for line in &lines {
        let (unit_price_cents, line_currency) = take_stock(conn, line, now).await?;
        match &currency {
            Some(first) if *first != line_currency => {
                return Err(StockError::MixedCurrencies {
                    first: first.clone(),
                    second: line_currency,
                });
            }
            _ => currency = Some(line_currency.clone()),
        }
        sqlx::query(
            "INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents) VALUES ($1, $2, $3, $4)",
        )
        .bind(order_id)
        .bind(&line.sku)
        .bind(line.quantity)
        .bind(unit_price_cents)
        .execute(&mut *conn)
        .await?;
        reserved.push(ReservedLine {
            sku: line.sku.clone(),
            quantity: line.quantity,
            unit_price_cents,
            currency: line_currency,
        });
    }
    let currency = currency.unwrap_or_default();
    let total_cents: i64 = reserved
        .iter()
        .map(|l| l.unit_price_cents * l.quantity)
        .sum();
    sqlx::query("UPDATE reservations SET total_cents = $1, currency = $2 WHERE order_id = $3")
        .bind(total_cents)
        .bind(&currency)
        .bind(order_id)
        .execute(&mut *conn)
        .await?;
    Ok(ReserveStockResponse {
        reservation_id,
        lines: reserved,
        total_cents,
        currency,
    })
}

/// Moves `line.quantity` units from available to reserved, if that many are
/// available. The check and the decrement are one statement, so concurrent
/// callers can never oversell.
async fn take_stock(
    conn: &mut AnyConnection,
    line: &Line,
    now: i64,
) -> Result<(i64, String), StockError> {
    let row = sqlx::query(
        "UPDATE products SET available = available - $1, reserved = reserved + $1, updated_at_ms = $2 \
         WHERE sku = $3 AND available >= $1 RETURNING unit_price_cents, currency",
    )
    .bind(line.quantity)
    .bind(now)
    .bind(&line.sku)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(row) = row {
        return Ok((row.try_get("unit_price_cents")?, row.try_get("currency")?));
    }
    let available: Option<i64> =
        sqlx::query_scalar("SELECT available FROM products WHERE sku = $1")
            .bind(&line.sku)
            .fetch_optional(&mut *conn)
            .await?;
    Err(match available {
        None => StockError::UnknownSku {
            sku: line.sku.clone(),
        },
        Some(available) => StockError::OutOfStock {
            sku: line.sku.clone(),
            available,
            requested: line.quantity,
        },
    })
}

/// Why a reservation row already exists for an order.
async fn existing_reservation(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<StockError, StockError> {
    let row = sqlx::query("SELECT reservation_id, status FROM reservations WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&mut *conn)
        .await?;
    let status: String = row.try_get("status")?;
    Ok(if status == "released" {
        StockError::AlreadyReleased {
            order_id: order_id.to_owned(),
        }
    } else {
        StockError::AlreadyReserved {
            order_id: order_id.to_owned(),
            reservation_id: row.try_get("reservation_id")?,
        }
    })
}

/// Returns an order's reserved stock. With nothing reserved it records a
/// tombstone and succeeds, so a late reserve is refused.
pub async fn release(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<ReleaseStockResponse, StockError> {
    let now = now_ms();
    let tombstone = sqlx::query(
        "INSERT INTO reservations (order_id, reservation_id, status, total_cents, currency, created_at_ms, updated_at_ms) \
         VALUES ($1, '', 'released', 0, '', $2, $2) ON CONFLICT (order_id) DO NOTHING",
    )
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
    let flipped = sqlx::query(
        "UPDATE reservations SET status = 'released', updated_at_ms = $1 WHERE order_id = $2 AND status = 'reserved'",
    )
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
    let lines =
        sqlx::query("SELECT sku, quantity FROM reservation_lines WHERE order_id = $1 ORDER BY sku")
            .bind(order_id)
            .fetch_all(&mut *conn)
            .await?;
    for line in lines {
        let sku: String = line.try_get("sku")?;
        let quantity: i64 = line.try_get("quantity")?;
        sqlx::query(
            "UPDATE products SET available = available + $1, reserved = reserved - $1, updated_at_ms = $2 WHERE sku = $3",
        )
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
