//! Checks of OrderService requests: INVALID_ARGUMENT naming the field, before
//! anything is read or written.

use std::collections::HashSet;

use ordersaga_proto::{
    Timestamp,
    orders::v1::{CreateOrderRequest, OrderStatus},
};
use svc_kit::{Error, validate};

use saga_engine::SagaStatus;

use crate::order_saga::ShippingAddress;

/// A create request that passed validation (items not yet priced).
pub struct NewOrder {
    pub request_id: String,
    pub customer_id: String,
    pub items: Vec<(String, i64)>,
    pub address: ShippingAddress,
}

pub fn create(req: &CreateOrderRequest) -> Result<NewOrder, Error> {
    validate::id("request_id", &req.request_id)?;
    validate::id("customer_id", &req.customer_id)?;
    validate::count("items", req.items.len(), validate::MAX_LINES)?;
    let mut seen = HashSet::with_capacity(req.items.len());
    let mut items = Vec::with_capacity(req.items.len());
    for (i, item) in req.items.iter().enumerate() {
        validate::sku(format!("items[{i}].sku"), &item.sku)?;
        validate::quantity(
            format!("items[{i}].quantity"),
            item.quantity,
            validate::MAX_LINE_QUANTITY,
        )?;
        if !seen.insert(item.sku.as_str()) {
            return Err(Error::invalid(
                format!("items[{i}].sku"),
                format!("{:?} appears more than once; merge the items", item.sku),
            ));
        }
        items.push((item.sku.clone(), item.quantity));
    }
    let a = validate::present("shipping_address", req.shipping_address.as_ref())?;
    validate::text("shipping_address.recipient", &a.recipient, 200)?;
    validate::text("shipping_address.line1", &a.line1, 200)?;
    validate::text("shipping_address.city", &a.city, 100)?;
    validate::text("shipping_address.postal_code", &a.postal_code, 20)?;
    validate::country("shipping_address.country", &a.country)?;
    Ok(NewOrder {
        request_id: req.request_id.clone(),
        customer_id: req.customer_id.clone(),
        items,
        address: ShippingAddress {
            recipient: a.recipient.clone(),
            line1: a.line1.clone(),
            city: a.city.clone(),
            postal_code: a.postal_code.clone(),
            country: a.country.clone(),
        },
    })
}

/// Most entries a status filter may have: each status once, with room to
/// spare. More can only be repeats, each a bind in the list query.
pub const MAX_STATUS_FILTER: usize = 16;

/// The saga statuses that a status filter selects, each once; PENDING
/// selects none (an order's saga starts in the same transaction that records it).
pub fn status_filter(statuses: &[i32]) -> Result<Vec<SagaStatus>, Error> {
    if statuses.len() > MAX_STATUS_FILTER {
        return Err(Error::invalid(
            "statuses",
            format!(
                "has {} entries, the limit is {MAX_STATUS_FILTER}",
                statuses.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(statuses.len());
    for (i, value) in statuses.iter().enumerate() {
        let status: OrderStatus = validate::known_enum(format!("statuses[{i}]"), *value, false)?;
        if let Some(saga) = crate::orders::view::saga_status(status)
            && !out.contains(&saga)
        {
            out.push(saga);
        }
    }
    Ok(out)
}

/// A `Timestamp` as milliseconds since the epoch; out-of-range nanos are refused.
fn timestamp_ms(field: &str, at: &Timestamp) -> Result<i64, Error> {
    if !(0..1_000_000_000).contains(&at.nanos) {
        return Err(Error::invalid(
            field,
            format!("nanos must be 0 to 999,999,999, got {}", at.nanos),
        ));
    }
    at.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(at.nanos / 1_000_000)))
        .ok_or_else(|| Error::invalid(field, format!("{} s is out of range", at.seconds)))
}

/// ListOrders' time window, `[created_after, created_before)` in ms; unset
/// ends are open. A window that ends before it starts is refused.
pub fn created_window(
    after: Option<&Timestamp>,
    before: Option<&Timestamp>,
) -> Result<(Option<i64>, Option<i64>), Error> {
    let after = after
        .map(|t| timestamp_ms("created_after", t))
        .transpose()?;
    let before = before
        .map(|t| timestamp_ms("created_before", t))
        .transpose()?;
    if let (Some(a), Some(b)) = (after, before)
        && b < a
    {
        return Err(Error::invalid(
            "created_before",
            "is earlier than created_after",
        ));
    }
    Ok((after, before))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_filter_is_deduplicated_and_capped() {
        let completed = OrderStatus::Completed as i32;
        assert_eq!(
            status_filter(&[completed, completed, completed]).unwrap(),
            vec![SagaStatus::Completed]
        );
        let refused = status_filter(&vec![completed; 1_000])
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("statuses") && refused.contains("1000"),
            "{refused}"
        );
    }
}
