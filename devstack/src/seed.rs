//! The demo data. Every seed call has a fixed `request_id`, so seeding again on
//! the next start is a no-op: the services return the stored replies.

use anyhow::Context;
use ordersaga_proto::{
    payment::v1::{DepositRequest, payment_service_client::PaymentServiceClient},
    stock::v1::{RestockRequest, stock_service_client::StockServiceClient},
};
use std::time::Duration;

use tonic::{
    Request,
    transport::{Channel, Endpoint},
};

/// SKU, name, unit price in cents, units.
const CATALOGUE: &[(&str, &str, i64, i64)] = &[
    ("BOOK-1", "The Rust Programming Language", 3_999, 100),
    ("MUG-1", "Saga mug", 1_250, 200),
    ("TSHIRT-1", "Compensation T-shirt", 2_400, 50),
    ("RARE-1", "Signed first edition", 50_000, 1),
];

/// Customer, deposit in cents. "poor" can't pay for anything.
const ACCOUNTS: &[(&str, i64)] = &[("alice", 100_000), ("bob", 50_000), ("poor", 500)];

fn authed<T>(message: T, key: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("x-api-key", key.parse()?);
    Ok(request)
}

/// Connects, waiting for a service that is still starting.
async fn connect(url: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_owned())?;
    for _ in 0..100 {
        if let Ok(channel) = endpoint.connect().await {
            return Ok(channel);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{url} did not come up within 10 s")
}

pub async fn demo(stock_url: &str, payment_url: &str, admin_key: &str) -> anyhow::Result<()> {
    let mut stock = StockServiceClient::new(
        connect(stock_url)
            .await
            .context("connect to the stock service")?,
    );
    for (sku, name, price, quantity) in CATALOGUE {
        let request = RestockRequest {
            request_id: format!("demo-seed-{sku}"),
            sku: (*sku).into(),
            quantity: *quantity,
            name: (*name).into(),
            unit_price_cents: *price,
            currency: "EUR".into(),
        };
        stock
            .restock(authed(request, admin_key)?)
            .await
            .with_context(|| format!("seed {sku}"))?;
    }
    let mut payment = PaymentServiceClient::new(
        connect(payment_url)
            .await
            .context("connect to the payment service")?,
    );
    for (customer, cents) in ACCOUNTS {
        let request = DepositRequest {
            request_id: format!("demo-seed-{customer}"),
            customer_id: (*customer).into(),
            amount_cents: *cents,
            currency: "EUR".into(),
        };
        payment
            .deposit(authed(request, admin_key)?)
            .await
            .with_context(|| format!("seed account {customer}"))?;
    }
    tracing::info!("demo catalogue and accounts seeded");
    Ok(())
}
