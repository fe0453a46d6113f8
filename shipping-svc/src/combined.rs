//! Many `PrepareShipment` requests in one statement, on PostgreSQL's shared
//! transaction ([`svc_kit::combined`]): the shipments of the batch's orders
//! and their requests' claims.
//!
//! A request is written only if its order has no shipment row yet (neither
//! prepared nor a cancellation's tombstone), its request was never claimed,
//! and neither its order nor its request appears twice in the batch. Any
//! other goes on alone, where [`crate::shipments::prepare`] answers it.

use ordersaga_proto::shipping::v1::Shipment;
use serde::Serialize;
use sqlx::AnyConnection;
use svc_kit::{
    combined::{BoxFuture, Combine, apply_numbered},
    idempotency::ClaimRow,
};

/// One request: the shipment it would insert, and its claim with the reply
/// that tells of that shipment.
#[derive(Serialize)]
pub struct Prepare {
    pub order_id: String,
    pub shipment_id: String,
    pub tracking_id: String,
    pub recipient: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
    pub service_level: i64,
    pub item_count: i64,
    #[serde(flatten)]
    pub claim: ClaimRow,
}

impl Prepare {
    /// `shipment` (of `item_count` items) prepared by the request of
    /// `claim`, whose reply tells of it.
    pub fn new(shipment: &Shipment, item_count: i64, claim: ClaimRow) -> Self {
        let address = shipment.address.clone().unwrap_or_default();
        Prepare {
            order_id: shipment.order_id.clone(),
            shipment_id: shipment.shipment_id.clone(),
            tracking_id: shipment.tracking_id.clone(),
            recipient: address.recipient,
            line1: address.line1,
            city: address.city,
            postal_code: address.postal_code,
            country: address.country,
            service_level: i64::from(shipment.service_level),
            item_count,
            claim,
        }
    }
}

const PREPARE_MANY: &str = concat!(
    "WITH i AS ( \
       SELECT * FROM jsonb_to_recordset($1::jsonb) AS i(n bigint, order_id text, shipment_id text, \
         tracking_id text, recipient text, line1 text, city text, postal_code text, country text, \
         service_level bigint, item_count bigint, request_id text, method text, fingerprint text, \
         at_ms bigint, reply text)), \
     ",
    svc_kit::fresh_items!("shipments"),
    ", \
     shipment AS ( \
       INSERT INTO shipments (order_id, shipment_id, tracking_id, status, recipient, line1, city, postal_code, \
         country, service_level, item_count, created_at_ms, updated_at_ms) \
       SELECT order_id, shipment_id, tracking_id, 'prepared', recipient, line1, city, postal_code, country, \
         service_level, item_count, at_ms, at_ms FROM fresh \
       ON CONFLICT (order_id) DO NOTHING RETURNING order_id), \
     written AS (SELECT f.* FROM fresh f JOIN shipment USING (order_id)), \
     claim AS (",
    svc_kit::claims_of!("written"),
    ") \
     SELECT n FROM written"
);

/// [`PREPARE_MANY`] for the shipping service's combiner.
pub struct PrepareMany;

impl Combine for PrepareMany {
    type Item = Prepare;
    type Written = ();

    fn apply<'a>(
        &'a self,
        conn: &'a mut AnyConnection,
        items: &'a [Prepare],
    ) -> BoxFuture<'a, Result<Vec<Option<()>>, sqlx::Error>> {
        Box::pin(apply_numbered(conn, PREPARE_MANY, items, |_| Ok(())))
    }
}
