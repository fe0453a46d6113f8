//! The run's world: one SKU with a unit for every order, one customer who can
//! pay for every order, and one who can pay for none. Seeded through the
//! services' own RPCs, retried through the built-in faults (each call carries
//! a request ID, so a retry is harmless).

use std::time::Duration;

use anyhow::Context;
use ordersaga_proto::{
    payment::v1::{DepositRequest, payment_service_client::PaymentServiceClient},
    stock::v1::{RestockRequest, stock_service_client::StockServiceClient},
};
use tonic::{Request, transport::Channel};

pub use orderbench::setup::{QUANTITY, UNIT_PRICE_CENTS};

/// The customer who can't pay holds this much, less than any order.
pub const POOR_BALANCE_CENTS: i64 = 1;
/// One order in ten is placed by the customer who can't pay.
pub const POOR_SHARE: f64 = 0.1;

/// orderbench's world (the names of the SKU and the customers), and how
/// many orders it is seeded for.
#[derive(Debug, Clone)]
pub struct World {
    pub names: orderbench::setup::World,
    pub orders: u64,
}

impl std::ops::Deref for World {
    type Target = orderbench::setup::World;

    fn deref(&self) -> &Self::Target {
        &self.names
    }
}

impl World {
    pub fn new(orders: u64) -> World {
        World {
            names: orderbench::setup::World::fresh(),
            orders,
        }
    }

    pub fn stock_seeded(&self) -> i64 {
        self.orders as i64 * QUANTITY
    }

    pub fn payer_deposit_cents(&self) -> i64 {
        self.orders as i64 * QUANTITY * UNIT_PRICE_CENTS
    }

    pub async fn seed(
        &self,
        stock_url: &str,
        payment_url: &str,
        admin_key: &str,
    ) -> anyhow::Result<()> {
        let stock = StockServiceClient::new(channel(stock_url)?);
        let restock = RestockRequest {
            request_id: format!("{}-restock", self.run_id),
            sku: self.sku.clone(),
            quantity: self.stock_seeded(),
            name: "chaos run item".into(),
            unit_price_cents: UNIT_PRICE_CENTS,
            currency: "EUR".into(),
        };
        retry("restock", || {
            let mut stock = stock.clone();
            let request = authed(restock.clone(), admin_key);
            async move { stock.restock(request?).await.map(drop) }
        })
        .await?;
        let payment = PaymentServiceClient::new(channel(payment_url)?);
        for (customer, cents) in [
            (&self.payer, self.payer_deposit_cents()),
            (&self.poor, POOR_BALANCE_CENTS),
        ] {
            let deposit = DepositRequest {
                request_id: format!("{}-deposit-{customer}", self.run_id),
                customer_id: customer.clone(),
                amount_cents: cents,
                currency: "EUR".into(),
            };
            retry("deposit", || {
                let mut payment = payment.clone();
                let request = authed(deposit.clone(), admin_key);
                async move { payment.deposit(request?).await.map(drop) }
            })
            .await?;
        }
        Ok(())
    }
}

fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?.connect_lazy())
}

pub fn authed<T>(message: T, key: &str) -> Result<Request<T>, tonic::Status> {
    let mut request = Request::new(message);
    let key = key
        .parse()
        .map_err(|_| tonic::Status::invalid_argument("the API key is not valid metadata"))?;
    request.metadata_mut().insert("x-api-key", key);
    Ok(request)
}

async fn retry<F, Fut>(what: &str, mut call: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let mut last = None;
    for _ in 0..50 {
        match call().await {
            Ok(()) => return Ok(()),
            Err(status) => last = Some(status),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("no attempt")))
    .with_context(|| format!("{what} kept failing"))
}
