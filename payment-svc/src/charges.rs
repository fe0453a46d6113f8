//! Charging and refunding an order: the saga step and its compensation.
//!
//! As in the stock service, the first of charge or refund to arrive inserts the
//! order's one row; a refund that finds nothing leaves a 'refunded' tombstone
//! that refuses a late charge.

use ordersaga_proto::payment::v1::{ChargeResponse, RefundResponse};
use sqlx::{AnyConnection, Row};
use svc_kit::time::now_ms;
use uuid::Uuid;

use crate::error::PaymentError;

/// A validated charge.
pub struct NewCharge {
    pub order_id: String,
    pub customer_id: String,
    pub amount_cents: i64,
    pub currency: String,
}

pub async fn charge(
    conn: &mut AnyConnection,
    new: NewCharge,
) -> Result<ChargeResponse, PaymentError> {
    let now = now_ms();
    let payment_id = Uuid::new_v4().to_string();
    let inserted = sqlx::query(
        "INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
         VALUES ($1, $2, $3, $4, $5, 'charged', $6, $6) ON CONFLICT (order_id) DO NOTHING",
    )
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
    // The funds check and the debit are one statement: concurrent charges can
    // never overdraw the account.
    let balance: Option<i64> = sqlx::query_scalar(
        "UPDATE accounts SET balance_cents = balance_cents - $1, updated_at_ms = $2 \
         WHERE customer_id = $3 AND currency = $4 AND balance_cents >= $1 RETURNING balance_cents",
    )
    .bind(new.amount_cents)
    .bind(now)
    .bind(&new.customer_id)
    .bind(&new.currency)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(balance_cents) = balance else {
        return Err(why_not_debited(conn, &new).await?);
    };
    Ok(ChargeResponse {
        payment_id,
        amount_cents: new.amount_cents,
        currency: new.currency,
        balance_cents,
    })
}

async fn why_not_debited(
    conn: &mut AnyConnection,
    new: &NewCharge,
) -> Result<PaymentError, PaymentError> {
    let row = sqlx::query("SELECT balance_cents, currency FROM accounts WHERE customer_id = $1")
        .bind(&new.customer_id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(PaymentError::UnknownAccount {
            customer_id: new.customer_id.clone(),
        });
    };
    let currency: String = row.try_get("currency")?;
    Ok(if currency != new.currency {
        PaymentError::CurrencyMismatch {
            customer_id: new.customer_id.clone(),
            account: currency,
            requested: new.currency.clone(),
        }
    } else {
        PaymentError::InsufficientFunds {
            customer_id: new.customer_id.clone(),
            balance_cents: row.try_get("balance_cents")?,
            amount_cents: new.amount_cents,
        }
    })
}

async fn existing_charge(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<PaymentError, PaymentError> {
    let row = sqlx::query("SELECT payment_id, status FROM charges WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&mut *conn)
        .await?;
    let status: String = row.try_get("status")?;
    Ok(if status == "refunded" {
        PaymentError::AlreadyRefunded {
            order_id: order_id.to_owned(),
        }
    } else {
        PaymentError::AlreadyCharged {
            order_id: order_id.to_owned(),
            payment_id: row.try_get("payment_id")?,
        }
    })
}

/// Refunds an order's charge. With no charge it records a tombstone and
/// succeeds, so a late charge is refused.
pub async fn refund(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<RefundResponse, PaymentError> {
    let now = now_ms();
    let tombstone = sqlx::query(
        "INSERT INTO charges (order_id, payment_id, customer_id, amount_cents, currency, status, created_at_ms, updated_at_ms) \
         VALUES ($1, '', '', 0, '', 'refunded', $2, $2) ON CONFLICT (order_id) DO NOTHING",
    )
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
    let refunded = sqlx::query(
        "UPDATE charges SET status = 'refunded', updated_at_ms = $1 WHERE order_id = $2 AND status = 'charged' \
         RETURNING customer_id, amount_cents",
    )
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
    sqlx::query("UPDATE accounts SET balance_cents = balance_cents + $1, updated_at_ms = $2 WHERE customer_id = $3")
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
