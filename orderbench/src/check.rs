//! After the load: is anything created or destroyed, and did each order end as
//! its customer dictates? Read through the services' own read RPCs.

use ordersaga_proto::{
    payment::v1::{GetAccountRequest, payment_service_client::PaymentServiceClient},
    stock::v1::{GetProductRequest, stock_service_client::StockServiceClient},
};

use crate::{
    BenchConfig,
    run::LoadResult,
    setup::{QUANTITY, UNIT_PRICE_CENTS, World, authed},
};

/// The verdict, with every failed condition spelled out.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub failures: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

pub async fn conservation(
    config: &BenchConfig,
    world: &World,
    load: &LoadResult,
) -> anyhow::Result<Verdict> {
    let mut failures = Vec::new();
    let mut expect = |what: &str, actual: i64, expected: i64| {
        if actual != expected {
            failures.push(format!("{what}: expected {expected}, got {actual}"));
        }
    };
    let n = config.orders as i64;
    let completed = *load.outcomes.get("COMPLETED").unwrap_or(&0) as i64;
    let compensated = *load.outcomes.get("COMPENSATED").unwrap_or(&0) as i64;
    expect(
        "orders answered",
        load.outcomes.values().sum::<u64>() as i64,
        n,
    );
    expect(
        "COMPENSATED orders (customers who can't pay)",
        compensated,
        load.expected_compensated as i64,
    );
    expect(
        "COMPLETED orders",
        completed,
        n - load.expected_compensated as i64,
    );

    let mut stock = StockServiceClient::connect(config.stock_addr.clone()).await?;
    let product = stock
        .get_product(authed(
            GetProductRequest {
                sku: world.sku.clone(),
            },
            &config.api_key,
        )?)
        .await?
        .into_inner()
        .product
        .unwrap_or_default();
    expect(
        "stock available + reserved (seeded)",
        product.available + product.reserved,
        n * QUANTITY,
    );
    expect(
        "stock reserved (sold)",
        product.reserved,
        completed * QUANTITY,
    );

    let mut payment = PaymentServiceClient::connect(config.payment_addr.clone()).await?;
    for (customer, deposited, charged) in [
        (
            &world.payer,
            n * QUANTITY * UNIT_PRICE_CENTS,
            completed * QUANTITY * UNIT_PRICE_CENTS,
        ),
        (&world.poor, 1, 0),
    ] {
        let account = payment
            .get_account(authed(
                GetAccountRequest {
                    customer_id: customer.clone(),
                },
                &config.api_key,
            )?)
            .await?
            .into_inner()
            .account
            .unwrap_or_default();
        expect(
            &format!("{customer}: balance + charged (deposited)"),
            account.balance_cents + account.charged_cents,
            deposited,
        );
        expect(
            &format!("{customer}: charged"),
            account.charged_cents,
            charged,
        );
    }
    Ok(Verdict { failures })
}
