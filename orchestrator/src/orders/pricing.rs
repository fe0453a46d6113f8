//! Prices an order from the stock service's catalogue before it is recorded, so
//! the order (and the amount the saga will charge) is fixed from the start.

use futures::future::try_join_all;
use ordersaga_proto::stock::v1::GetProductRequest;
use tonic::{Code, Request};

use crate::{downstream::StockClient, error::OrderError, order_saga::PricedItem};

/// The priced items, their total and their currency.
pub async fn price(
    stock: &StockClient,
    items: &[(String, i64)],
) -> Result<(Vec<PricedItem>, i64, String), OrderError> {
    let lookups = items.iter().enumerate().map(|(i, (sku, quantity))| {
        let mut client = stock.clone();
        async move {
            let mut request = Request::new(GetProductRequest { sku: sku.clone() });
            request.set_timeout(std::time::Duration::from_secs(5));
            match client.get_product(request).await {
                Ok(reply) => {
                    let product = reply.into_inner().product.unwrap_or_default();
                    Ok((
                        PricedItem {
                            sku: sku.clone(),
                            quantity: *quantity,
                            unit_price_cents: product.unit_price_cents,
                        },
                        product.currency,
                    ))
                }
                Err(status) if status.code() == Code::NotFound => Err(OrderError::UnknownSku {
                    field: format!("items[{i}].sku"),
                    sku: sku.clone(),
                }),
                Err(status) => Err(OrderError::PricingUnavailable(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                ))),
            }
        }
    });
    let priced = try_join_all(lookups).await?;
    let currency = priced.first().map(|(_, c)| c.clone()).unwrap_or_default();
    if let Some((_, other)) = priced.iter().find(|(_, c)| *c != currency) {
        return Err(OrderError::MixedCurrencies {
            first: currency,
            second: other.clone(),
        });
    }
    let items: Vec<PricedItem> = priced.into_iter().map(|(item, _)| item).collect();
    let total = items.iter().map(|i| i.unit_price_cents * i.quantity).sum();
    Ok((items, total, currency))
}
