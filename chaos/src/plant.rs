//! Planted faults: an effect applied a second time behind the saga's back,
//! straight in a service's store, to prove that the audit can fail.

use sqlx::Row;

use crate::{
    audit::{StoredOrder, Stores, stored_orders},
    world::{QUANTITY, UNIT_PRICE_CENTS, World},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plant {
    /// A completed order's charge taken from the payer's balance again.
    DoubleCharge,
    /// A completed order's unit of stock reserved again.
    DoubleReserve,
}

impl std::str::FromStr for Plant {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "double-charge" => Ok(Plant::DoubleCharge),
            "double-reserve" => Ok(Plant::DoubleReserve),
            other => Err(format!(
                "{other:?} is not a planted fault: double-charge or double-reserve"
            )),
        }
    }
}

impl Plant {
    pub async fn apply(self, world: &World, stores: &Stores) -> anyhow::Result<()> {
        let orders = stored_orders(&stores.orchestrator).await?;
        let Some(order) = orders
            .iter()
            .find(|o| o.status == "COMPLETED" && o.customer_id == world.payer)
        else {
            anyhow::bail!("no COMPLETED order to plant a second effect on");
        };
        sqlx::any::install_default_drivers();
        match self {
            Plant::DoubleCharge => {
                let pool = sqlx::AnyPool::connect(&stores.payment).await?;
                let amount: i64 =
                    sqlx::query("SELECT amount_cents FROM charges WHERE order_id = $1")
                        .bind(&order.order_id)
                        .fetch_one(&pool)
                        .await?
                        .get(0);
                debug_assert_eq!(amount, QUANTITY * UNIT_PRICE_CENTS);
                sqlx::query(
                    "UPDATE accounts SET balance_cents = balance_cents - $1 WHERE customer_id = $2",
                )
                .bind(amount)
                .bind(&world.payer)
                .execute(&pool)
                .await?;
                pool.close().await;
            }
            Plant::DoubleReserve => {
                let pool = sqlx::AnyPool::connect(&stores.stock).await?;
                sqlx::query("UPDATE products SET available = available - $1, reserved = reserved + $1 WHERE sku = $2")
                    .bind(QUANTITY)
                    .bind(&world.sku)
                    .execute(&pool)
                    .await?;
                pool.close().await;
            }
        }
        println!("planted: {self:?} on order {}", describe(order));
        Ok(())
    }
}

fn describe(order: &StoredOrder) -> String {
    format!("{} ({})", order.order_id, order.request_id)
}
