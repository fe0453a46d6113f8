//! A fresh world per run: one SKU with enough stock for every order, one
//! customer who can pay for all of them, and one who can pay for none.

use ordersaga_proto::{
    payment::v1::{DepositRequest, payment_service_client::PaymentServiceClient},
    stock::v1::{RestockRequest, stock_service_client::StockServiceClient},
};
use tonic::Request;

use crate::BenchConfig;

pub const UNIT_PRICE_CENTS: i64 = 1_999;
pub const QUANTITY: i64 = 1;

#[derive(Debug, Clone)]
pub struct World {
    pub run_id: String,
    pub sku: String,
    pub payer: String,
    pub poor: String,
}

pub fn authed<T>(message: T, key: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("x-api-key", key.parse()?);
    Ok(request)
}

impl World {
    /// Names no earlier run used: a SKU, a customer who pays, one who can't.
    pub fn fresh() -> World {
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        World {
            sku: format!("BENCH-{run_id}"),
            payer: format!("bench-{run_id}"),
            poor: format!("bench-poor-{run_id}"),
            run_id,
        }
    }
}

pub async fn prepare(config: &BenchConfig) -> anyhow::Result<World> {
    let world = World::fresh();
    let n = config.orders as i64;
    let mut stock = StockServiceClient::connect(config.stock_addr.clone()).await?;
    stock
        .restock(authed(
            RestockRequest {
                request_id: format!("{}-restock", world.run_id),
                sku: world.sku.clone(),
                quantity: n * QUANTITY,
                name: "orderbench item".into(),
                unit_price_cents: UNIT_PRICE_CENTS,
                currency: "EUR".into(),
            },
            &config.admin_key,
        )?)
        .await?;
    let mut payment = PaymentServiceClient::connect(config.payment_addr.clone()).await?;
    for (customer, cents) in [
        (&world.payer, n * QUANTITY * UNIT_PRICE_CENTS),
        (&world.poor, 1),
    ] {
        payment
            .deposit(authed(
                DepositRequest {
                    request_id: format!("{}-deposit-{customer}", world.run_id),
                    customer_id: customer.clone(),
                    amount_cents: cents,
                    currency: "EUR".into(),
                },
                &config.admin_key,
            )?)
            .await?;
    }
    Ok(world)
}
