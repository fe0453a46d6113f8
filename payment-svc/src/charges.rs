//! Charging and refunding an order: the saga step and its compensation.
//!
//! As in the stock service, the first of charge or refund to arrive inserts the
//! order's one row; a refund that finds nothing leaves a 'refunded' tombstone
//! that refuses a late charge.

use ordersaga_proto::payment::v1::{ChargeResponse, Payment, PaymentStatus, RefundResponse};
use rusqlite::{OptionalExtension, params};
use sqlx::{AnyConnection, Row, any::AnyRow};
use svc_kit::{
    idempotency::{Claim, Claimed},
    time::now_ms,
};
use uuid::Uuid;

use crate::error::PaymentError;

/// A validated charge.
#[derive(Clone)]
pub struct NewCharge {
    pub order_id: String,
    pub customer_id: String,
    pub amount_cents: i64,
    pub currency: String,
}

const INSERT_CHARGE: &str = "INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
     VALUES ($1, $2, $3, $4, $5, 'charged', $6, $6) ON CONFLICT (order_id) DO NOTHING";
/// The funds check and the debit are one statement: concurrent charges can
/// never overdraw the account.
const DEBIT: &str = "UPDATE accounts SET balance_cents = balance_cents - $1, updated_at_ms = $2 \
     WHERE customer_id = $3 AND currency = $4 AND balance_cents >= $1 RETURNING balance_cents";
/// [`INSERT_CHARGE`] and [`DEBIT`] as one statement, for PostgreSQL (SQLite
/// has no data-modifying `WITH`), with the request's claim and its reply
/// when given one. It writes all of them or nothing, so a refusal needs no
/// savepoint to take back, and a request alone commits with it
/// ([`svc_kit::idempotency::Refusal::OneStatement`]): the debit happens
/// only with the funds there, no charge of the order and no claim of the
/// request yet, the charge only with the debit, and the claim only with
/// the charge. The debit's row comes back only if it happened. Without a
/// debit it then reads (as they stood before it) what may have stood in
/// the way, for the refusal: one round trip, where reading them after it
/// cost two more; a charge that went through skips those reads (each is
/// gated on `refused`, a filter the server checks once, before its scan).
///
/// The reply carries the balance after the debit, known only here: the
/// caller encodes the rest of it (the balance at 0, which protobuf leaves
/// out) and the statement appends the balance's field (number 4, a varint:
/// tag byte 0x20) unless it is 0. Fields in order of their numbers are how
/// prost encodes them, so the stored reply is the one returned, byte for
/// byte.
///
/// The charge's or the claim's insert finds its key taken only in a race
/// with another connection: the order's charge, or the request's claim,
/// inserted and committed by a second process meanwhile. The inserts then
/// fail the statement whole (no `ON CONFLICT`): had they done nothing
/// instead, the debit would stay wherever no rollback follows.
const CHARGE_AND_DEBIT: &str = "WITH debit AS ( \
       UPDATE accounts SET balance_cents = balance_cents - $4, updated_at_ms = $6 \
       WHERE customer_id = $3 AND currency = $5 AND balance_cents >= $4 \
         AND NOT EXISTS (SELECT 1 FROM charges WHERE order_id = $1) \
         AND NOT EXISTS (SELECT 1 FROM idempotency WHERE request_id = $7) \
       RETURNING balance_cents), \
     charge AS ( \
       INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
       SELECT $1, $2, $3, $4, $5, 'charged', $6, $6 FROM debit RETURNING 1), \
     claim AS ( \
       INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, reply) \
       SELECT $7, $8, $9, $10, 0, \
         $11 || CASE WHEN d.balance_cents = 0 THEN ''::bytea ELSE '\\x20'::bytea || protobuf_varint(d.balance_cents) END \
       FROM debit d, charge WHERE $7 IS NOT NULL RETURNING 1), \
     refused AS (SELECT NOT EXISTS (SELECT 1 FROM debit) AS yes) \
     SELECT (SELECT balance_cents FROM debit) AS balance_cents, \
       EXISTS (SELECT 1 FROM idempotency WHERE request_id = $7 AND (SELECT yes FROM refused)) AS claimed_before, \
       c.payment_id AS existing_id, c.status AS existing_status, \
       a.balance_cents AS account_balance, a.currency AS account_currency \
     FROM (SELECT 1) AS one \
       LEFT JOIN LATERAL (SELECT payment_id, status FROM charges \
         WHERE order_id = $1 AND (SELECT yes FROM refused)) c ON true \
       LEFT JOIN LATERAL (SELECT balance_cents, currency FROM accounts \
         WHERE customer_id = $3 AND (SELECT yes FROM refused)) a ON true";
const ACCOUNT: &str = "SELECT balance_cents, currency FROM accounts WHERE customer_id = $1";
const EXISTING_CHARGE: &str = "SELECT payment_id, status FROM charges WHERE order_id = $1";
const TOMBSTONE: &str = "INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
     VALUES ($1, '', '', 0, '', 'refunded', $2, $2) ON CONFLICT (order_id) DO NOTHING";
const MARK_REFUNDED: &str = "UPDATE charges SET status = 'refunded', updated_at_ms = $1 WHERE order_id = $2 AND status = 'charged' \
     RETURNING customer_id, amount_cents";
const CREDIT: &str = "UPDATE accounts SET balance_cents = balance_cents + $1, updated_at_ms = $2 WHERE customer_id = $3";

/// Charges an order; with a claim (on PostgreSQL's shared transaction) the
/// request's claim and reply are written in the charge's statement.
pub async fn charge(
    conn: &mut AnyConnection,
    new: NewCharge,
    claim: Option<&Claim<'_>>,
) -> Result<(ChargeResponse, Claimed), PaymentError> {
    let now = now_ms();
    let payment_id = Uuid::new_v4().to_string();
    if conn.backend_name() == "PostgreSQL" {
        return charge_in_one_statement(conn, new, payment_id, now, claim).await;
    }
    let inserted = sqlx::query(INSERT_CHARGE)
        .bind(&new.order_id)
        .bind(&payment_id)
        .bind(&new.customer_id)
        .bind(new.amount_cents)
        .bind(&new.currency)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if inserted == 0 {
        return Err(existing_charge(conn, &new.order_id).await?);
    }
    let balance: Option<i64> = sqlx::query_scalar(DEBIT)
        .bind(new.amount_cents)
        .bind(now)
        .bind(&new.customer_id)
        .bind(&new.currency)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(balance_cents) = balance else {
        return Err(why_not_debited(conn, &new).await?);
    };
    let reply = ChargeResponse {
        payment_id,
        amount_cents: new.amount_cents,
        currency: new.currency,
        balance_cents,
    };
    Ok((reply, Claimed::No))
}

/// [`charge`] on PostgreSQL: one round trip when the charge goes through;
/// a refusal reads what stood in its way.
async fn charge_in_one_statement(
    conn: &mut AnyConnection,
    new: NewCharge,
    payment_id: String,
    now: i64,
    claim: Option<&Claim<'_>>,
) -> Result<(ChargeResponse, Claimed), PaymentError> {
    // The reply but its balance, which the statement appends.
    let mut reply = ChargeResponse {
        payment_id,
        amount_cents: new.amount_cents,
        currency: new.currency.clone(),
        balance_cents: 0,
    };
    let query = sqlx::query(CHARGE_AND_DEBIT)
        .bind(&new.order_id)
        .bind(&reply.payment_id)
        .bind(&new.customer_id)
        .bind(new.amount_cents)
        .bind(&new.currency)
        .bind(now);
    let row = Claim::bind_if_any(claim, query, &reply)
        .fetch_one(&mut *conn)
        .await
        .map_err(|err| {
            svc_kit::Error::unless_raced(err, || {
                format!(
                    "order {} was charged by another connection meanwhile; try again",
                    new.order_id
                )
            })
        })?;
    let Some(balance_cents) = row.try_get::<Option<i64>, _>("balance_cents")? else {
        // Nothing was written: the request was answered before, the order
        // was charged or refunded before, or the account could not pay.
        if row.try_get::<bool, _>("claimed_before")? {
            return Ok((reply, Claimed::Before));
        }
        if let Some(why) = why_not_charged(&new, &row)? {
            return Err(why);
        }
        // All was as needed when the statement read it: another connection
        // changed it meanwhile (the debit waited on the account's row and
        // saw it as committed after). A refusal is stored for good, so its
        // cause is read again as it stands now.
        return Err(match existing_charge_if_any(conn, &new.order_id).await? {
            Some(already) => already,
            None => why_not_debited(conn, &new).await?,
        });
    };
    reply.balance_cents = balance_cents;
    let claimed = match claim {
        None => Claimed::No,
        Some(_) => Claimed::Yes,
    };
    Ok((reply, claimed))
}

/// Why [`CHARGE_AND_DEBIT`] wrote nothing, from what it read: the order's
/// charge (or a refund's tombstone), then the account. `None` when what it
/// read explains nothing.
fn why_not_charged(new: &NewCharge, row: &AnyRow) -> Result<Option<PaymentError>, PaymentError> {
    if let Some(status) = row.try_get::<Option<String>, _>("existing_status")? {
        return Ok(Some(already(
            &new.order_id,
            row.try_get("existing_id")?,
            status,
        )));
    }
    let account = match row.try_get::<Option<String>, _>("account_currency")? {
        Some(currency) => Some((row.try_get::<i64, _>("account_balance")?, currency)),
        None => None,
    };
    Ok(match &account {
        Some((balance_cents, currency))
            if *currency == new.currency && *balance_cents >= new.amount_cents =>
        {
            None
        }
        _ => Some(refusal(new, account)),
    })
}

async fn why_not_debited(
    conn: &mut AnyConnection,
    new: &NewCharge,
) -> Result<PaymentError, PaymentError> {
    let row = sqlx::query(ACCOUNT)
        .bind(&new.customer_id)
        .fetch_optional(&mut *conn)
        .await?;
    let account = row
        .map(|r| Ok::<_, sqlx::Error>((r.try_get("balance_cents")?, r.try_get("currency")?)))
        .transpose()?;
    Ok(refusal(new, account))
}

/// Why a debit of `new` did not happen, given the account (balance, currency).
fn refusal(new: &NewCharge, account: Option<(i64, String)>) -> PaymentError {
    let Some((balance_cents, currency)) = account else {
        return PaymentError::UnknownAccount {
            customer_id: new.customer_id.clone(),
        };
    };
    if currency != new.currency {
        PaymentError::CurrencyMismatch {
            customer_id: new.customer_id.clone(),
            account: currency,
            requested: new.currency.clone(),
        }
    } else {
        PaymentError::InsufficientFunds {
            customer_id: new.customer_id.clone(),
            balance_cents,
            amount_cents: new.amount_cents,
        }
    }
}

async fn existing_charge(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<PaymentError, PaymentError> {
    existing_charge_if_any(conn, order_id)
        .await?
        .ok_or_else(|| svc_kit::Error::Internal(format!("order {order_id} has no charge")).into())
}

/// Why a charge of `order_id` is refused, if the order has a charge (or
/// a refund's tombstone).
async fn existing_charge_if_any(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<PaymentError>, PaymentError> {
    let Some(row) = sqlx::query(EXISTING_CHARGE)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(already(
        order_id,
        row.try_get("payment_id")?,
        row.try_get("status")?,
    )))
}

/// Why a second charge of an order is refused.
fn already(order_id: &str, payment_id: String, status: String) -> PaymentError {
    if status == "refunded" {
        PaymentError::AlreadyRefunded {
            order_id: order_id.to_owned(),
        }
    } else {
        PaymentError::AlreadyCharged {
            order_id: order_id.to_owned(),
            payment_id,
        }
    }
}

/// Refunds an order's charge. With no charge it records a tombstone and
/// succeeds, so a late charge is refused.
pub async fn refund(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<RefundResponse, PaymentError> {
    let now = now_ms();
    let tombstone = sqlx::query(TOMBSTONE)
        .bind(order_id)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if tombstone == 1 {
        return Ok(RefundResponse {
            refunded_charge: false,
            amount_cents: 0,
        });
    }
    let refunded = sqlx::query(MARK_REFUNDED)
        .bind(now)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = refunded else {
        // Refunded before: nothing more to do.
        return Ok(RefundResponse {
            refunded_charge: false,
            amount_cents: 0,
        });
    };
    let customer_id: String = row.try_get("customer_id")?;
    let amount_cents: i64 = row.try_get("amount_cents")?;
    sqlx::query(CREDIT)
        .bind(amount_cents)
        .bind(now)
        .bind(&customer_id)
        .execute(&mut *conn)
        .await?;
    Ok(RefundResponse {
        refunded_charge: true,
        amount_cents,
    })
}

/// [`charge`] on the store's batch writer (a SQLite file): the same statements.
pub fn charge_sqlite(
    conn: &rusqlite::Connection,
    new: NewCharge,
) -> Result<ChargeResponse, PaymentError> {
    let now = now_ms();
    let payment_id = Uuid::new_v4().to_string();
    let inserted = conn.prepare_cached(INSERT_CHARGE)?.execute(params![
        new.order_id,
        payment_id,
        new.customer_id,
        new.amount_cents,
        new.currency,
        now,
    ])?;
    if inserted == 0 {
        let (payment_id, status) = conn
            .prepare_cached(EXISTING_CHARGE)?
            .query_row(params![new.order_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        return Err(already(&new.order_id, payment_id, status));
    }
    let balance: Option<i64> = conn
        .prepare_cached(DEBIT)?
        .query_row(
            params![new.amount_cents, now, new.customer_id, new.currency],
            |r| r.get(0),
        )
        .optional()?;
    let Some(balance_cents) = balance else {
        let account = conn
            .prepare_cached(ACCOUNT)?
            .query_row(params![new.customer_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        return Err(refusal(&new, account));
    };
    Ok(ChargeResponse {
        payment_id,
        amount_cents: new.amount_cents,
        currency: new.currency,
        balance_cents,
    })
}

/// [`refund`] on the store's batch writer (a SQLite file): the same statements.
pub fn refund_sqlite(
    conn: &rusqlite::Connection,
    order_id: &str,
) -> Result<RefundResponse, PaymentError> {
    let now = now_ms();
    if conn
        .prepare_cached(TOMBSTONE)?
        .execute(params![order_id, now])?
        == 1
    {
        return Ok(RefundResponse {
            refunded_charge: false,
            amount_cents: 0,
        });
    }
    let refunded: Option<(String, i64)> = conn
        .prepare_cached(MARK_REFUNDED)?
        .query_row(params![now, order_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((customer_id, amount_cents)) = refunded else {
        return Ok(RefundResponse {
            refunded_charge: false,
            amount_cents: 0,
        });
    };
    conn.prepare_cached(CREDIT)?
        .execute(params![amount_cents, now, customer_id])?;
    Ok(RefundResponse {
        refunded_charge: true,
        amount_cents,
    })
}

const PAYMENT: &str = "SELECT payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms \
     FROM charges WHERE order_id = $1";

/// An order's payment, for audits; `None` when the order never reached
/// this service.
pub async fn get(conn: &mut AnyConnection, order_id: &str) -> Result<Option<Payment>, sqlx::Error> {
    let Some(row) = sqlx::query(PAYMENT)
        .bind(order_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let status: String = row.try_get("status")?;
    Ok(Some(Payment {
        payment_id: row.try_get("payment_id")?,
        order_id: order_id.to_owned(),
        customer_id: row.try_get("customer_id")?,
        amount_cents: row.try_get("amount_cents")?,
        currency: row.try_get("currency")?,
        status: match status.as_str() {
            "charged" => PaymentStatus::Charged,
            _ => PaymentStatus::Refunded,
        } as i32,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    }))
}
