//! Prices an order from the stock service's catalogue before it is recorded, so
//! the order (and the amount the saga will charge) is fixed from the start.

use std::time::Duration;

use futures::future::try_join_all;
use ordersaga_proto::stock::v1::{GetProductRequest, Product};
use saga_engine::retry::{Answer, classify};
use tonic::{Code, Request, Status};

use crate::{downstream::StockClient, error::OrderError, order_saga::PricedItem};

/// Lookups are reads, so transient failures are retried a few times before
/// the client is told to retry.
const LOOKUP_ATTEMPTS: u32 = 4;

/// The priced items, their total and their currency.
pub async fn price(
    stock: &StockClient,
    items: &[(String, i64)],
) -> Result<(Vec<PricedItem>, i64, String), OrderError> {
    let lookups = items.iter().enumerate().map(|(i, (sku, quantity))| {
        let mut client = stock.clone();
        async move {
            match lookup(&mut client, sku).await {
                Ok(product) => Ok((
                    PricedItem {
                        sku: sku.clone(),
                        quantity: *quantity,
                        unit_price_cents: product.unit_price_cents,
                    },
                    product.currency,
                )),
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

async fn lookup(client: &mut StockClient, sku: &str) -> Result<Product, Status> {
    let mut attempt = 1;
    loop {
        let mut request = Request::new(GetProductRequest {
            sku: sku.to_owned(),
        });
        request.set_timeout(Duration::from_secs(5));
        match client.get_product(request).await {
            Ok(reply) => return Ok(reply.into_inner().product.unwrap_or_default()),
            Err(status)
                if classify(status.code()) == Answer::Unknown && attempt < LOOKUP_ATTEMPTS =>
            {
                tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}
