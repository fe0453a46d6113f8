//! The orders table: the client's idempotency key, lookups and listing. An
//! order and its saga are recorded in one transaction (see [`admit`]).

use ordersaga_proto::orders::v1::Order;
use sqlx::{AnyConnection, AnyPool, Row};
use uuid::Uuid;

use futures::future::BoxFuture;
use rusqlite::OptionalExtension;
use saga_engine::{Admission, Admit, Engine, SagaStatus, SagaView, log};

use crate::{error::OrderError, order_saga::OrderData, orders::view};

const FIND_BY_REQUEST_ID: &str = "SELECT order_id, fingerprint FROM orders WHERE request_id = $1";

/// The order a `request_id` created, with the fingerprint of its request.
pub async fn find_by_request_id(
    engine: &Engine<OrderData>,
    request_id: &str,
) -> Result<Option<(Uuid, Vec<u8>)>, OrderError> {
    let found: Option<(String, Vec<u8>)> = match engine.sqlite_reader() {
        Some(reader) => {
            let request_id = request_id.to_owned();
            reader
                .run(move |conn| {
                    conn.prepare_cached(FIND_BY_REQUEST_ID)?
                        .query_row(rusqlite::params![request_id], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()
                })
                .await
                .map_err(|e| OrderError::from(sqlx::Error::Protocol(e)))?
        }
        None => sqlx::query(FIND_BY_REQUEST_ID)
            .bind(request_id)
            .fetch_optional(engine.pool())
            .await?
            .map(|r| Ok::<_, sqlx::Error>((r.try_get("order_id")?, r.try_get("fingerprint")?)))
            .transpose()?,
    };
    found
        .map(|(id, fingerprint)| Ok((parse_id(&id)?, fingerprint)))
        .transpose()
}

/// The order's part of the transaction that starts its saga: the order row,
/// which holds the client's idempotency key. Refused when another request with
/// the same `request_id` got there first.
pub struct AdmitOrder {
    order_id: String,
    request_id: String,
    fingerprint: Vec<u8>,
    customer_id: String,
}

const INSERT_ORDER: &str = "INSERT INTO orders (order_id, request_id, fingerprint, customer_id, created_at_ms) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id) DO NOTHING";
/// [`INSERT_ORDER`] for a batch's new orders, as the engine writes them with
/// their sagas, in one statement (PostgreSQL; see `Admit::insert_rows_sql`):
/// `$1` holds one [`OrderRow`] per order, in the batch's order, so that of two
/// with one `request_id` the first is written.
const INSERT_ORDERS: &str = "INSERT INTO orders (order_id, request_id, fingerprint, customer_id, created_at_ms) \
     SELECT o.order_id, o.request_id, decode(o.fingerprint, 'hex'), o.customer_id, o.at_ms \
     FROM ROWS FROM (jsonb_to_recordset($1::jsonb) \
       AS (order_id text, request_id text, fingerprint text, customer_id text, at_ms bigint)) \
       WITH ORDINALITY AS o(order_id, request_id, fingerprint, customer_id, at_ms, n) \
     ORDER BY o.n \
     ON CONFLICT (request_id) DO NOTHING RETURNING order_id AS saga_id";

/// An order's row of [`INSERT_ORDERS`]'s `$1`.
#[derive(serde::Serialize)]
struct OrderRow<'a> {
    order_id: &'a str,
    request_id: &'a str,
    fingerprint: String,
    customer_id: &'a str,
    at_ms: i64,
}

impl AdmitOrder {
    pub fn new(order: &OrderData, fingerprint: Vec<u8>) -> Self {
        AdmitOrder {
            order_id: order.order_id.to_string(),
            request_id: order.request_id.clone(),
            fingerprint,
            customer_id: order.customer_id.clone(),
        }
    }
}

fn admission(inserted: u64) -> Admission {
    if inserted == 1 {
        Admission::Admit
    } else {
        Admission::Refuse
    }
}

impl Admit for AdmitOrder {
    fn admit<'c>(
        &'c self,
        conn: &'c mut AnyConnection,
        at_ms: i64,
    ) -> BoxFuture<'c, Result<Admission, sqlx::Error>> {
        Box::pin(async move {
            let inserted = sqlx::query(INSERT_ORDER)
                .bind(&self.order_id)
                .bind(&self.request_id)
                .bind(&self.fingerprint)
                .bind(&self.customer_id)
                .bind(at_ms)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            Ok(admission(inserted))
        })
    }

    fn insert_rows_sql(&self) -> Option<&'static str> {
        Some(INSERT_ORDERS)
    }

    fn insert_row(&self, at_ms: i64) -> String {
        serde_json::to_string(&OrderRow {
            order_id: &self.order_id,
            request_id: &self.request_id,
            fingerprint: svc_kit::idempotency::hex(&self.fingerprint),
            customer_id: &self.customer_id,
            at_ms,
        })
        .expect("an order's row serializes")
    }

    fn admit_sqlite(&self, conn: &rusqlite::Connection, at_ms: i64) -> rusqlite::Result<Admission> {
        let inserted = conn
            .prepare_cached(INSERT_ORDER)?
            .execute(rusqlite::params![
                self.order_id,
                self.request_id,
                self.fingerprint,
                self.customer_id,
                at_ms,
            ])?;
        Ok(admission(inserted as u64))
    }
}

/// The order with its saga's state and step history.
pub async fn load(
    conn: &mut AnyConnection,
    order_id: Uuid,
) -> Result<Option<(Order, SagaStatus)>, OrderError> {
    log::load_view(conn, order_id)
        .await?
        .map(|saga| render(order_id, &saga))
        .transpose()
}

/// One order, through the engine (on a SQLite file, its reader thread).
pub async fn load_one(
    engine: &Engine<OrderData>,
    order_id: Uuid,
) -> Result<(Order, SagaStatus), OrderError> {
    let saga = engine
        .view(order_id)
        .await?
        .ok_or_else(|| OrderError::NotFound(order_id.to_string()))?;
    render(order_id, &saga)
}

/// The order of a saga read from the log.
pub fn render(order_id: Uuid, saga: &SagaView) -> Result<(Order, SagaStatus), OrderError> {
    let data: OrderData = serde_json::from_str(&saga.data_json)
        .map_err(|e| svc_kit::Error::Internal(format!("order {order_id} data: {e}")))?;
    Ok((view::order(&data, saga), saga.status))
}

/// Where a page of orders starts: after this (created_at_ms, order_id), newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageToken {
    pub created_at_ms: i64,
    pub order_id: String,
}

impl PageToken {
    pub fn encode(&self) -> String {
        format!("{}_{}", self.created_at_ms, self.order_id)
    }

    pub fn decode(token: &str) -> Option<PageToken> {
        let (ms, id) = token.split_once('_')?;
        Uuid::parse_str(id).ok()?;
        Some(PageToken {
            created_at_ms: ms.parse().ok()?,
            order_id: id.to_owned(),
        })
    }
}

pub struct ListFilter {
    pub customer_id: Option<String>,
    /// Empty means any status.
    pub statuses: Vec<SagaStatus>,
    pub after: Option<PageToken>,
    /// Created at or after this time (ms), when set.
    pub created_after_ms: Option<i64>,
    /// Created before this time (ms), when set.
    pub created_before_ms: Option<i64>,
    pub limit: u32,
}

/// One page of order IDs, newest first, and the token of the next page.
pub async fn list(
    pool: &AnyPool,
    filter: &ListFilter,
) -> Result<(Vec<Uuid>, Option<PageToken>), OrderError> {
    let mut sql = String::from(
        "SELECT o.order_id, o.created_at_ms FROM orders o JOIN sagas s ON s.saga_id = o.order_id \
         WHERE ($1 = '' OR o.customer_id = $1) \
         AND (o.created_at_ms < $2 OR (o.created_at_ms = $2 AND o.order_id < $3)) \
         AND o.created_at_ms >= $5 AND o.created_at_ms < $6",
    );
    if !filter.statuses.is_empty() {
        // Only our own fixed status names are spliced in, never client text.
        let names: Vec<String> = filter
            .statuses
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        sql.push_str(&format!(" AND s.status IN ({})", names.join(", ")));
    }
    sql.push_str(" ORDER BY o.created_at_ms DESC, o.order_id DESC LIMIT $4");
    let (after_ms, after_id) = match &filter.after {
        Some(t) => (t.created_at_ms, t.order_id.clone()),
        None => (i64::MAX, String::new()),
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(filter.customer_id.clone().unwrap_or_default())
        .bind(after_ms)
        .bind(after_id)
        .bind(i64::from(filter.limit) + 1)
        .bind(filter.created_after_ms.unwrap_or(i64::MIN))
        .bind(filter.created_before_ms.unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
    let mut page = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = row.try_get("order_id")?;
        page.push((parse_id(&id)?, row.try_get::<i64, _>("created_at_ms")?));
    }
    let next = if page.len() > filter.limit as usize {
        page.truncate(filter.limit as usize);
        page.last().map(|(id, ms)| PageToken {
            created_at_ms: *ms,
            order_id: id.to_string(),
        })
    } else {
        None
    };
    Ok((page.into_iter().map(|(id, _)| id).collect(), next))
}

fn parse_id(id: &str) -> Result<Uuid, OrderError> {
    Uuid::parse_str(id)
        .map_err(|e| svc_kit::Error::Internal(format!("bad order id {id:?} in store: {e}")).into())
}
