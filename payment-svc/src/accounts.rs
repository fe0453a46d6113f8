//! Customer accounts: lookup and deposits.

use ordersaga_proto::payment::v1::Account;
use sqlx::{AnyConnection, Row};
use svc_kit::time::now_ms;

use crate::error::PaymentError;

pub async fn get(conn: &mut AnyConnection, customer_id: &str) -> Result<Account, PaymentError> {
    let row = sqlx::query("SELECT balance_cents, currency FROM accounts WHERE customer_id = $1")
        .bind(customer_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| PaymentError::UnknownAccount {
            customer_id: customer_id.to_owned(),
        })?;
    // SUM is NUMERIC on PostgreSQL, which the Any driver cannot decode: cast it.
    let charged_cents: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM charges WHERE customer_id = $1 AND status = 'charged'",
    )
    .bind(customer_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Account {
        customer_id: customer_id.to_owned(),
        balance_cents: row.try_get("balance_cents")?,
        currency: row.try_get("currency")?,
        charged_cents,
    })
}

/// Adds money to an account, opening it in `currency` when it is new.
pub async fn deposit(
    conn: &mut AnyConnection,
    customer_id: &str,
    amount_cents: i64,
    currency: &str,
) -> Result<Account, PaymentError> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO accounts (customer_id, balance_cents, currency, created_at_ms, updated_at_ms) \
         VALUES ($1, 0, $2, $3, $3) ON CONFLICT (customer_id) DO NOTHING",
    )
    .bind(customer_id)
    .bind(currency)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let added = sqlx::query(
        "UPDATE accounts SET balance_cents = balance_cents + $1, updated_at_ms = $2 WHERE customer_id = $3 AND currency = $4",
    )
    .bind(amount_cents)
    .bind(now)
    .bind(customer_id)
    .bind(currency)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let account = get(conn, customer_id).await?;
    if added == 0 {
        return Err(PaymentError::CurrencyMismatch {
            customer_id: customer_id.to_owned(),
            account: account.currency,
            requested: currency.to_owned(),
        });
    }
    Ok(account)
}
