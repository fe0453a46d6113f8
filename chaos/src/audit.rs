//! After the run: read every service's own store and every delivered event,
//! and check them against each other and against what the clients saw.
//!
//! The services keep one row per order (a reservation, a shipment, a
//! charge), so an effect applied twice does not show as two rows: it shows
//! as stock or money that is not conserved. Both are checked.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::{AnyPool, Row};

use crate::{
    events::Delivered,
    load::ClientRecord,
    world::{POOR_BALANCE_CENTS, QUANTITY, UNIT_PRICE_CENTS, World},
};

/// Where each service keeps its state.
#[derive(Debug, Clone)]
pub struct Stores {
    pub orchestrator: String,
    pub stock: String,
    pub shipping: String,
    pub payment: String,
}

/// An order as the orchestrator's store has it.
#[derive(Debug, Clone)]
pub struct StoredOrder {
    pub order_id: String,
    pub request_id: String,
    pub customer_id: String,
    pub status: String,
}

#[derive(Debug, Default)]
pub struct Audit {
    pub outcomes: BTreeMap<String, u64>,
    /// Orders or effects that should exist and do not.
    pub lost: u64,
    /// Effects that exist more often than the outcome allows.
    pub doubled: u64,
    /// Orders not terminal at the end.
    pub stuck: u64,
    /// Orders whose `created` or terminal event never arrived.
    pub events_lost: u64,
    /// Events delivered again (same `message_id`), which consumers drop.
    pub events_redelivered: u64,
    pub violations: Vec<String>,
}

impl Audit {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }
}

const TERMINAL: [&str; 4] = ["COMPLETED", "COMPENSATED", "FAILED", "CANCELLED"];

fn terminal_event(status: &str) -> Option<&'static str> {
    Some(match status {
        "COMPLETED" => "order.completed",
        "COMPENSATED" => "order.compensated",
        "FAILED" => "order.failed",
        "CANCELLED" => "order.cancelled",
        _ => return None,
    })
}

async fn pool(url: &str) -> anyhow::Result<AnyPool> {
    sqlx::any::install_default_drivers();
    Ok(sqlx::pool::PoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?)
}

pub async fn stored_orders(orchestrator: &str) -> anyhow::Result<Vec<StoredOrder>> {
    let pool = pool(orchestrator).await?;
    let rows = sqlx::query(
        "SELECT o.order_id, o.request_id, o.customer_id, s.status
         FROM orders o JOIN sagas s ON s.saga_id = o.order_id",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows
        .iter()
        .map(|row| StoredOrder {
            order_id: row.get(0),
            request_id: row.get(1),
            customer_id: row.get(2),
            status: row.get(3),
        })
        .collect())
}

/// How many terminal orders still miss their terminal event.
pub fn terminal_events_missing(orders: &[StoredOrder], delivered: &[Delivered]) -> usize {
    let seen: HashSet<(&str, &str)> = delivered
        .iter()
        .map(|d| (d.order_id.as_str(), d.event_type.as_str()))
        .collect();
    orders
        .iter()
        .filter(|o| {
            terminal_event(&o.status)
                .is_some_and(|event| !seen.contains(&(o.order_id.as_str(), event)))
        })
        .count()
}

pub async fn audit(
    world: &World,
    stores: &Stores,
    clients: &[ClientRecord],
    delivered: &[Delivered],
) -> anyhow::Result<Audit> {
    let mut audit = Audit::default();
    let orders = stored_orders(&stores.orchestrator).await?;
    let by_request: HashMap<&str, &StoredOrder> =
        orders.iter().map(|o| (o.request_id.as_str(), o)).collect();
    let by_id: HashMap<&str, &StoredOrder> =
        orders.iter().map(|o| (o.order_id.as_str(), o)).collect();

    check_orders(&mut audit, world, &orders, &by_request, clients);
    check_stock(&mut audit, world, stores, &by_id).await?;
    check_shipping(&mut audit, stores, &by_id).await?;
    check_payment(&mut audit, world, stores, &by_id).await?;
    check_events(&mut audit, &orders, delivered);
    Ok(audit)
}

/// Every client's order: exactly one, terminal, and the client saw what the
/// store says.
fn check_orders(
    audit: &mut Audit,
    world: &World,
    orders: &[StoredOrder],
    by_request: &HashMap<&str, &StoredOrder>,
    clients: &[ClientRecord],
) {
    if orders.len() != by_request.len() {
        audit.doubled += (orders.len() - by_request.len()) as u64;
        audit.violation(format!(
            "{} orders share a request_id",
            orders.len() - by_request.len()
        ));
    }
    for order in orders {
        *audit.outcomes.entry(order.status.clone()).or_default() += 1;
        if !TERMINAL.contains(&order.status.as_str()) {
            audit.stuck += 1;
            audit.violation(format!(
                "order {} is stuck in {}",
                order.order_id, order.status
            ));
        }
    }
    let requested: HashSet<&str> = clients.iter().map(|c| c.request_id.as_str()).collect();
    for order in orders {
        if !requested.contains(order.request_id.as_str()) {
            audit.doubled += 1;
            audit.violation(format!(
                "order {} has a request_id no client sent ({})",
                order.order_id, order.request_id
            ));
        }
    }
    for client in clients {
        let Some(stored) = by_request.get(client.request_id.as_str()) else {
            audit.lost += 1;
            audit.violation(format!("{}: no order was recorded", client.request_id));
            continue;
        };
        let expected_customer = if client.poor {
            &world.poor
        } else {
            &world.payer
        };
        if &stored.customer_id != expected_customer {
            audit.violation(format!(
                "{}: recorded for customer {}",
                client.request_id, stored.customer_id
            ));
        }
        match &client.outcome {
            None => {
                if TERMINAL.contains(&stored.status.as_str()) {
                    audit.violation(format!(
                        "{}: the client gave up, yet the order is {}",
                        client.request_id, stored.status
                    ));
                }
            }
            Some(seen) if seen != &stored.status => audit.violation(format!(
                "{}: the client saw {seen}, the store says {}",
                client.request_id, stored.status
            )),
            Some(_) => {}
        }
        if client
            .order_id
            .as_deref()
            .is_some_and(|id| id != stored.order_id)
        {
            audit.doubled += 1;
            audit.violation(format!(
                "{}: the client was given order {:?}, the store has {}",
                client.request_id, client.order_id, stored.order_id
            ));
        }
    }
}

/// Checks a service's per-order rows: the effect is in force exactly when
/// the order COMPLETED, and no row belongs to an order nobody made.
fn check_effects(
    audit: &mut Audit,
    what: &str,
    in_force: &str,
    rows: &[(String, String)],
    by_id: &HashMap<&str, &StoredOrder>,
) {
    let mut held = HashSet::new();
    for (order_id, status) in rows {
        let active = status == in_force;
        match by_id.get(order_id.as_str()) {
            None if active => {
                audit.doubled += 1;
                audit.violation(format!("{what} {order_id} ({status}) belongs to no order"));
            }
            None => {}
            Some(order) if active && order.status != "COMPLETED" => {
                audit.doubled += 1;
                audit.violation(format!(
                    "{what} of order {order_id} is still {status}, but the order is {}",
                    order.status
                ));
            }
            Some(_) => {}
        }
        if active {
            held.insert(order_id.as_str());
        }
    }
    for order in by_id.values() {
        if order.status == "COMPLETED" && !held.contains(order.order_id.as_str()) {
            audit.lost += 1;
            audit.violation(format!(
                "order {} COMPLETED without its {what} ({in_force})",
                order.order_id
            ));
        }
    }
}

/// How a count that is off reads: an effect applied too often, or missing.
#[derive(Clone, Copy, PartialEq)]
enum Counts {
    /// More than expected means an effect applied too often (stock reserved).
    Effects,
    /// Less than expected means an effect applied too often (a balance).
    Remainder,
}

fn conserve(audit: &mut Audit, what: &str, actual: i64, expected: i64, counts: Counts) {
    if actual == expected {
        return;
    }
    if (actual > expected) == (counts == Counts::Effects) {
        audit.doubled += 1;
    } else {
        audit.lost += 1;
    }
    audit.violation(format!("{what}: expected {expected}, found {actual}"));
}

fn completed(by_id: &HashMap<&str, &StoredOrder>, customer: Option<&str>) -> i64 {
    by_id
        .values()
        .filter(|o| o.status == "COMPLETED" && customer.is_none_or(|c| o.customer_id == c))
        .count() as i64
}

async fn check_stock(
    audit: &mut Audit,
    world: &World,
    stores: &Stores,
    by_id: &HashMap<&str, &StoredOrder>,
) -> anyhow::Result<()> {
    let pool = pool(&stores.stock).await?;
    let rows: Vec<(String, String)> = sqlx::query("SELECT order_id, status FROM reservations")
        .fetch_all(&pool)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    check_effects(audit, "reservation", "reserved", &rows, by_id);
    let product = sqlx::query("SELECT available, reserved FROM products WHERE sku = $1")
        .bind(&world.sku)
        .fetch_one(&pool)
        .await?;
    let (available, reserved): (i64, i64) = (product.get(0), product.get(1));
    let lines: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM reservation_lines l
         JOIN reservations r ON r.order_id = l.order_id
         WHERE r.status = 'reserved' AND l.sku = $1",
    )
    .bind(&world.sku)
    .fetch_one(&pool)
    .await?
    .get(0);
    pool.close().await;
    conserve(
        audit,
        "stock available + reserved (seeded)",
        available + reserved,
        world.stock_seeded(),
        Counts::Remainder,
    );
    conserve(
        audit,
        "stock reserved (sold to COMPLETED orders)",
        reserved,
        completed(by_id, None) * QUANTITY,
        Counts::Effects,
    );
    conserve(
        audit,
        "stock reserved = sum of held reservation lines",
        reserved,
        lines,
        Counts::Effects,
    );
    Ok(())
}

async fn check_shipping(
    audit: &mut Audit,
    stores: &Stores,
    by_id: &HashMap<&str, &StoredOrder>,
) -> anyhow::Result<()> {
    let pool = pool(&stores.shipping).await?;
    let rows: Vec<(String, String)> = sqlx::query("SELECT order_id, status FROM shipments")
        .fetch_all(&pool)
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    pool.close().await;
    check_effects(audit, "shipment", "prepared", &rows, by_id);
    Ok(())
}

async fn check_payment(
    audit: &mut Audit,
    world: &World,
    stores: &Stores,
    by_id: &HashMap<&str, &StoredOrder>,
) -> anyhow::Result<()> {
    let pool = pool(&stores.payment).await?;
    let charges = sqlx::query("SELECT order_id, status, customer_id, amount_cents FROM charges")
        .fetch_all(&pool)
        .await?;
    let rows: Vec<(String, String)> = charges.iter().map(|r| (r.get(0), r.get(1))).collect();
    check_effects(audit, "charge", "charged", &rows, by_id);
    let price = QUANTITY * UNIT_PRICE_CENTS;
    let mut charged_by: HashMap<String, i64> = HashMap::new();
    for row in &charges {
        let (order_id, status, customer, amount): (String, String, String, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if status == "charged" {
            *charged_by.entry(customer).or_default() += amount;
            if amount != price {
                audit.violation(format!(
                    "charge of order {order_id}: {amount} cents, not {price}"
                ));
            }
        }
    }
    for (customer, deposited) in [
        (&world.payer, world.payer_deposit_cents()),
        (&world.poor, POOR_BALANCE_CENTS),
    ] {
        let balance: i64 = sqlx::query("SELECT balance_cents FROM accounts WHERE customer_id = $1")
            .bind(customer)
            .fetch_one(&pool)
            .await?
            .get(0);
        let charged = charged_by.get(customer.as_str()).copied().unwrap_or(0);
        conserve(
            audit,
            &format!("{customer}: balance + charged (deposited)"),
            balance + charged,
            deposited,
            Counts::Remainder,
        );
        conserve(
            audit,
            &format!("{customer}: charged (COMPLETED orders × price)"),
            charged,
            completed(by_id, Some(customer)) * price,
            Counts::Effects,
        );
        conserve(
            audit,
            &format!("{customer}: balance"),
            balance,
            deposited - completed(by_id, Some(customer)) * price,
            Counts::Remainder,
        );
    }
    pool.close().await;
    Ok(())
}

/// Every order's events arrived, deduplicated by `message_id`, in `sequence`
/// order with no gap, from `created` to the event of its outcome.
fn check_events(audit: &mut Audit, orders: &[StoredOrder], delivered: &[Delivered]) {
    let mut by_order: HashMap<&str, Vec<&Delivered>> = HashMap::new();
    let mut seen = HashSet::new();
    for delivery in delivered {
        if !seen.insert(delivery.message_id.as_str()) {
            audit.events_redelivered += 1;
            continue;
        }
        by_order
            .entry(delivery.order_id.as_str())
            .or_default()
            .push(delivery);
    }
    for order in orders {
        let events = by_order.remove(order.order_id.as_str()).unwrap_or_default();
        let types: Vec<&str> = events.iter().map(|d| d.event_type.as_str()).collect();
        let sequences: Vec<i64> = events.iter().map(|d| d.sequence).collect();
        let expected_last = terminal_event(&order.status);
        if types.first() != Some(&"order.created")
            || expected_last.is_some_and(|last| types.last() != Some(&last))
        {
            audit.events_lost += 1;
            audit.violation(format!(
                "order {} ({}): events {types:?}",
                order.order_id, order.status
            ));
            continue;
        }
        if sequences != (1..=sequences.len() as i64).collect::<Vec<_>>() {
            audit.violation(format!(
                "order {}: sequences arrived as {sequences:?} ({types:?})",
                order.order_id
            ));
        }
    }
    for (order_id, events) in by_order {
        audit.violation(format!(
            "{} events of order {order_id}, which the store does not have",
            events.len()
        ));
    }
}
