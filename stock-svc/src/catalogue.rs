//! The product catalogue: lookup, listing and restocking.

use ordersaga_proto::stock::v1::Product;
use sqlx::{AnyConnection, AnyPool, Row, any::AnyRow};
use svc_kit::time::now_ms;

use crate::error::StockError;

fn product_from_row(row: &AnyRow) -> Result<Product, sqlx::Error> {
    Ok(Product {
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        unit_price_cents: row.try_get("unit_price_cents")?,
        currency: row.try_get("currency")?,
        available: row.try_get("available")?,
        reserved: row.try_get("reserved")?,
    })
}

pub async fn get(conn: &mut AnyConnection, sku: &str) -> Result<Product, StockError> {
    let row = sqlx::query(
        "SELECT sku, name, unit_price_cents, currency, available, reserved FROM products WHERE sku = $1",
    )
    .bind(sku)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| StockError::UnknownSku { sku: sku.to_owned() })?;
    Ok(product_from_row(&row)?)
}

/// One page of products in SKU order, starting after `after`. Returns the page
/// and the SKU to continue after, if there are more.
pub async fn list(
    pool: &AnyPool,
    after: &str,
    limit: u32,
) -> Result<(Vec<Product>, Option<String>), StockError> {
    let rows = sqlx::query(
        "SELECT sku, name, unit_price_cents, currency, available, reserved FROM products \
         WHERE sku > $1 ORDER BY sku LIMIT $2",
    )
    .bind(after)
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    let mut products = rows
        .iter()
        .map(product_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = if products.len() > limit as usize {
        products.truncate(limit as usize);
        products.last().map(|p| p.sku.clone())
    } else {
        None
    };
    Ok((products, next))
}

/// What a restock adds; the product fields are needed only for a new SKU.
pub struct Restock {
    pub sku: String,
    pub quantity: i64,
    pub new_product: Option<NewProduct>,
}

pub struct NewProduct {
    pub name: String,
    pub unit_price_cents: i64,
    pub currency: String,
}

pub async fn restock(conn: &mut AnyConnection, restock: Restock) -> Result<Product, StockError> {
    let now = now_ms();
    let added = sqlx::query(
        "UPDATE products SET available = available + $1, updated_at_ms = $2 WHERE sku = $3",
    )
    .bind(restock.quantity)
    .bind(now)
    .bind(&restock.sku)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if added == 0 {
        let Some(new) = restock.new_product else {
            return Err(StockError::NewSkuIncomplete { sku: restock.sku });
        };
        sqlx::query(
            "INSERT INTO products (sku, name, unit_price_cents, currency, available, reserved, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, 0, $6, $6)",
        )
        .bind(&restock.sku)
        .bind(&new.name)
        .bind(new.unit_price_cents)
        .bind(&new.currency)
        .bind(restock.quantity)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    get(conn, &restock.sku).await
}
