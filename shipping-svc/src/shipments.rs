//! Preparing and cancelling an order's shipment: the saga step and its compensation.
//!
//! As in the stock service, the first of prepare or cancel to arrive inserts the
//! order's one row; a cancellation that finds nothing leaves a 'cancelled'
//! tombstone that refuses a late prepare.

use ordersaga_proto::shipping::v1::{
    Address, CancelShipmentResponse, PrepareShipmentResponse, ServiceLevel, Shipment,
    ShipmentStatus,
};
use rusqlite::params;
use sqlx::{AnyConnection, Row, any::AnyRow};
use svc_kit::{
    idempotency::{Claim, Claimed},
    time::now_ms,
};
use uuid::Uuid;

use crate::error::ShippingError;

/// A validated shipment request.
#[derive(Clone)]
pub struct NewShipment {
    pub order_id: String,
    pub address: Address,
    pub service_level: ServiceLevel,
    pub item_count: i64,
}

/// The insert of a prepared shipment, parameters `$1` to `$11`, its row
/// between `open` and `close` (`VALUES (…)`, or a `SELECT` with a
/// condition): one text for [`INSERT_SHIPMENT`] and [`PREPARE_CLAIMING`].
macro_rules! insert_shipment {
    ($open:literal, $close:literal) => {
        concat!(
            "INSERT INTO shipments (order_id, shipment_id, tracking_id, status, recipient, line1, city, postal_code, \
             country, service_level, item_count, created_at_ms, updated_at_ms) ",
            $open,
            "$1, $2, $3, 'prepared', $4, $5, $6, $7, $8, $9, $10, $11, $11",
            $close,
            " ON CONFLICT (order_id) DO NOTHING"
        )
    };
}
const INSERT_SHIPMENT: &str = insert_shipment!("VALUES (", ")");
/// [`INSERT_SHIPMENT`] and the request's claim with its reply in one
/// statement, on PostgreSQL's shared transaction: the shipment only if the
/// request was not claimed yet, the claim only if the shipment was
/// inserted. It writes both or nothing, so a request alone commits with it
/// ([`svc_kit::idempotency::Refusal::OneStatement`]). The claim's insert
/// finds its key taken only in a race with another connection (the same
/// request claimed and committed by a second process meanwhile): it then
/// fails the statement whole (no `ON CONFLICT`), where doing nothing would
/// leave a shipment that no request's reply tells of.
const PREPARE_CLAIMING: &str = concat!(
    "WITH shipment AS (",
    insert_shipment!(
        "SELECT ",
        " WHERE NOT EXISTS (SELECT 1 FROM idempotency WHERE request_id = $12)"
    ),
    " RETURNING order_id), \
     claim AS ( \
       INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
       SELECT $12, $13, $14, $15, 0, $16 FROM shipment RETURNING 1) \
     SELECT (SELECT COUNT(*) FROM shipment) AS inserted"
);
const TOMBSTONE: &str = "INSERT INTO shipments (order_id, shipment_id, tracking_id, status, recipient, line1, city, postal_code, \
     country, service_level, item_count, created_at_ms, updated_at_ms) \
     VALUES ($1, '', '', 'cancelled', '', '', '', '', '', 0, 0, $2, $2) ON CONFLICT (order_id) DO NOTHING";
const MARK_CANCELLED: &str = "UPDATE shipments SET status = 'cancelled', updated_at_ms = $1 WHERE order_id = $2 AND status = 'prepared'";
const EXISTING: &str = "SELECT shipment_id, status FROM shipments WHERE order_id = $1";
/// [`cancel`] on PostgreSQL's shared transaction, in one statement with the
/// request's claim ([`svc_kit::undo`]): the order's tombstone when it has
/// no shipment, else its shipment cancelled if it was prepared.
const CANCEL_CLAIMING: &str = svc_kit::undo_claiming!(
    table: "shipments",
    tombstone: "(order_id, shipment_id, tracking_id, status, recipient, line1, city, postal_code, \
       country, service_level, item_count, created_at_ms, updated_at_ms) \
       SELECT $1, '', '', 'cancelled', '', '', '', '', '', 0, 0, $2, $2",
    undo: "SET status = 'cancelled', updated_at_ms = $2 WHERE order_id = $1 AND status = 'prepared'",
);

/// Why a second prepare of an order is refused.
fn already(order_id: String, shipment_id: String, cancelled: bool) -> ShippingError {
    if cancelled {
        ShippingError::AlreadyCancelled { order_id }
    } else {
        ShippingError::AlreadyPrepared {
            order_id,
            shipment_id,
        }
    }
}

/// Prepares an order's shipment; with a claim (on PostgreSQL's shared
/// transaction), writes the request's claim with its reply in the same
/// statement (the reply is known before: it is the row inserted).
pub async fn prepare(
    conn: &mut AnyConnection,
    new: NewShipment,
    claim: Option<&Claim<'_>>,
) -> Result<(Shipment, Claimed), ShippingError> {
    let item_count = new.item_count;
    // Built from what is inserted, not read back: a round trip fewer.
    let shipment = to_prepare(new);
    let now = shipment.created_at_ms;
    let address = shipment
        .address
        .as_ref()
        .expect("a prepared shipment has its address");
    let claim = claim.filter(|_| conn.backend_name() == "PostgreSQL");
    let insert = sqlx::query(match claim {
        Some(_) => PREPARE_CLAIMING,
        None => INSERT_SHIPMENT,
    })
    .bind(&shipment.order_id)
    .bind(&shipment.shipment_id)
    .bind(&shipment.tracking_id)
    .bind(&address.recipient)
    .bind(&address.line1)
    .bind(&address.city)
    .bind(&address.postal_code)
    .bind(&address.country)
    .bind(shipment.service_level as i64)
    .bind(item_count)
    .bind(now);
    let (inserted, claimed) = match claim {
        Some(claim) => {
            let reply = PrepareShipmentResponse {
                shipment: Some(shipment.clone()),
            };
            let row = claim
                .bind(insert, &reply)
                .fetch_one(&mut *conn)
                .await
                .map_err(|err| {
                    svc_kit::Error::unless_raced(err, || {
                        format!(
                            "request {} was claimed by another connection meanwhile; try again",
                            claim.request_id()
                        )
                    })
                })?;
            (row.try_get::<i64, _>("inserted")?, Claimed::Yes)
        }
        None => (
            insert.execute(&mut *conn).await?.rows_affected() as i64,
            Claimed::No,
        ),
    };
    if inserted == 1 {
        return Ok((shipment, claimed));
    }
    let existing = get(conn, &shipment.order_id).await?;
    let cancelled = existing.status == ShipmentStatus::Cancelled as i32;
    Err(already(shipment.order_id, existing.shipment_id, cancelled))
}

/// The shipment a prepare of `new` inserts: new IDs, as of now.
pub fn to_prepare(new: NewShipment) -> Shipment {
    let shipment_id = Uuid::new_v4().to_string();
    let tracking_id = format!("TRK-{}", &Uuid::new_v4().simple().to_string()[..12]).to_uppercase();
    prepared(new, shipment_id, tracking_id, now_ms())
}

/// The shipment [`INSERT_SHIPMENT`] just wrote.
fn prepared(new: NewShipment, shipment_id: String, tracking_id: String, now: i64) -> Shipment {
    Shipment {
        shipment_id,
        order_id: new.order_id,
        tracking_id,
        status: ShipmentStatus::Prepared as i32,
        address: Some(new.address),
        service_level: new.service_level as i32,
        created_at_ms: now,
        updated_at_ms: now,
    }
}

/// Cancels an order's shipment. With none prepared it records a tombstone and
/// succeeds, so a late prepare is refused.
pub async fn cancel(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<CancelShipmentResponse, ShippingError> {
    let now = now_ms();
    let tombstone = sqlx::query(TOMBSTONE)
        .bind(order_id)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if tombstone == 1 {
        return Ok(CancelShipmentResponse {
            cancelled_shipment: false,
        });
    }
    let cancelled = sqlx::query(MARK_CANCELLED)
        .bind(now)
        .bind(order_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(CancelShipmentResponse {
        cancelled_shipment: cancelled == 1,
    })
}

/// [`cancel`] given the request's claim: on PostgreSQL's shared
/// transaction, [`CANCEL_CLAIMING`]; elsewhere as [`cancel`] goes, the
/// claim left to its caller.
pub async fn cancel_claiming(
    conn: &mut AnyConnection,
    order_id: &str,
    claim: Option<&Claim<'_>>,
) -> Result<(CancelShipmentResponse, Claimed), ShippingError> {
    let Some(claim) = claim.filter(|_| conn.backend_name() == "PostgreSQL") else {
        return Ok((cancel(conn, order_id).await?, Claimed::No));
    };
    let cancelled = CancelShipmentResponse {
        cancelled_shipment: true,
    };
    let not_cancelled = CancelShipmentResponse {
        cancelled_shipment: false,
    };
    Ok(svc_kit::undo::run(
        conn,
        CANCEL_CLAIMING,
        "cancel",
        order_id,
        claim,
        cancelled,
        not_cancelled,
    )
    .await?)
}

pub async fn get(conn: &mut AnyConnection, order_id: &str) -> Result<Shipment, ShippingError> {
    let row = sqlx::query(
        "SELECT order_id, shipment_id, tracking_id, status, recipient, line1, city, postal_code, country, \
         service_level, created_at_ms, updated_at_ms FROM shipments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| ShippingError::NoShipment {
        order_id: order_id.to_owned(),
    })?;
    Ok(shipment_from_row(&row)?)
}

fn shipment_from_row(row: &AnyRow) -> Result<Shipment, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let status = match status.as_str() {
        "prepared" => ShipmentStatus::Prepared,
        _ => ShipmentStatus::Cancelled,
    };
    let service_level: i64 = row.try_get("service_level")?;
    Ok(Shipment {
        shipment_id: row.try_get("shipment_id")?,
        order_id: row.try_get("order_id")?,
        tracking_id: row.try_get("tracking_id")?,
        status: status as i32,
        address: Some(Address {
            recipient: row.try_get("recipient")?,
            line1: row.try_get("line1")?,
            city: row.try_get("city")?,
            postal_code: row.try_get("postal_code")?,
            country: row.try_get("country")?,
        }),
        service_level: service_level as i32,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

/// [`prepare`] on the store's batch writer (a SQLite file): the same
/// statements; the reply is built from what was inserted.
pub fn prepare_sqlite(
    conn: &rusqlite::Connection,
    new: NewShipment,
) -> Result<Shipment, ShippingError> {
    let now = now_ms();
    let shipment_id = Uuid::new_v4().to_string();
    let tracking_id = format!("TRK-{}", &Uuid::new_v4().simple().to_string()[..12]).to_uppercase();
    let address = &new.address;
    let inserted = conn.prepare_cached(INSERT_SHIPMENT)?.execute(params![
        new.order_id,
        shipment_id,
        tracking_id,
        address.recipient,
        address.line1,
        address.city,
        address.postal_code,
        address.country,
        new.service_level as i32 as i64,
        new.item_count,
        now,
    ])?;
    if inserted == 0 {
        let (shipment_id, status): (String, String) = conn
            .prepare_cached(EXISTING)?
            .query_row(params![new.order_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        return Err(already(new.order_id, shipment_id, status == "cancelled"));
    }
    Ok(prepared(new, shipment_id, tracking_id, now))
}

/// [`cancel`] on the store's batch writer (a SQLite file): the same statements.
pub fn cancel_sqlite(
    conn: &rusqlite::Connection,
    order_id: &str,
) -> Result<CancelShipmentResponse, ShippingError> {
    let now = now_ms();
    if conn
        .prepare_cached(TOMBSTONE)?
        .execute(params![order_id, now])?
        == 1
    {
        return Ok(CancelShipmentResponse {
            cancelled_shipment: false,
        });
    }
    let cancelled = conn
        .prepare_cached(MARK_CANCELLED)?
        .execute(params![now, order_id])?;
    Ok(CancelShipmentResponse {
        cancelled_shipment: cancelled == 1,
    })
}
