//! The whole system for end-to-end saga tests: the three domain services and
//! the orchestrator, each on its own fresh store, with a seeded catalogue and
//! accounts, and ways to count effects in each service's own store.

use std::collections::BTreeMap;

use orchestrator::{EngineArgs, downstream::DownstreamArgs, outbox::relay::BrokerArgs};
use ordersaga_proto::{
    client::OrderClient,
    orders::v1::{CreateOrderRequest, OrderItem, ShippingAddress},
    payment::v1::{DepositRequest, payment_service_client::PaymentServiceClient},
    stock::v1::{RestockRequest, stock_service_client::StockServiceClient},
};
use sqlx::AnyPool;
use svc_kit::fault::FaultSettings;
use tonic::transport::Channel;

use crate::{API_KEY, Backend, Running, admin, services};

/// The seeded catalogue: SKU, unit price in cents, units in stock.
pub const CATALOGUE: &[(&str, i64, i64)] = &[
    ("BOOK", 1_500, 10_000),
    ("PEN", 250, 10_000),
    ("RARE", 99_00, 1),
];
/// The seeded accounts: customer, balance in cents.
pub const ACCOUNTS: &[(&str, i64)] = &[("alice", 1_000_000_000), ("poor", 100)];

#[derive(Default, Clone)]
pub struct Options {
    pub stock_faults: FaultSettings,
    pub shipping_faults: FaultSettings,
    pub payment_faults: FaultSettings,
    pub engine: Option<EngineArgs>,
    /// RabbitMQ for order events; none keeps them in the outbox.
    pub broker: Option<BrokerArgs>,
}

impl Options {
    /// The same faults on all three domain services.
    pub fn faults_everywhere(faults: FaultSettings) -> Self {
        Options {
            stock_faults: faults.clone(),
            shipping_faults: faults.clone(),
            payment_faults: faults,
            engine: None,
            broker: None,
        }
    }
}

pub struct DomainServices {
    pub stock: Running,
    pub shipping: Running,
    pub payment: Running,
    /// Where the orchestrator reaches stock, when not directly (a proxy).
    pub stock_endpoint: Option<String>,
    /// Where the orchestrator reaches shipping, when not directly (a proxy).
    pub shipping_endpoint: Option<String>,
    /// Where the orchestrator reaches payment, when not directly (a proxy).
    pub payment_endpoint: Option<String>,
}

impl DomainServices {
    /// Starts the three services and seeds them (seeding is not faulted: it
    /// goes straight to the stores' APIs before faults matter, with retries).
    pub async fn start(backend: Backend, options: &Options) -> DomainServices {
        let services = DomainServices {
            stock: services::stock_with_faults(backend, options.stock_faults.clone()).await,
            shipping: services::shipping_with_faults(backend, options.shipping_faults.clone())
                .await,
            payment: services::payment_with_faults(backend, options.payment_faults.clone()).await,
            stock_endpoint: None,
            shipping_endpoint: None,
            payment_endpoint: None,
        };
        seed(&services.stock.endpoint(), &services.payment.endpoint()).await;
        services
    }

    pub fn downstream(&self) -> DownstreamArgs {
        let (stock, shipping, payment) = self.endpoints();
        DownstreamArgs::local(stock, shipping, payment)
    }

    /// Where the orchestrator reaches stock, shipping and payment.
    pub fn endpoints(&self) -> (String, String, String) {
        (
            self.stock_endpoint
                .clone()
                .unwrap_or_else(|| self.stock.endpoint()),
            self.shipping_endpoint
                .clone()
                .unwrap_or_else(|| self.shipping.endpoint()),
            self.payment_endpoint
                .clone()
                .unwrap_or_else(|| self.payment.endpoint()),
        )
    }

    /// What the services' own stores say happened.
    pub async fn effects(&self) -> Effects {
        let stock = self.stock.db.pool().await;
        let shipping = self.shipping.db.pool().await;
        let payment = self.payment.db.pool().await;
        let mut products = BTreeMap::new();
        for (sku, _, _) in CATALOGUE {
            let row: (i64, i64) =
                sqlx::query_as("SELECT available, reserved FROM products WHERE sku = $1")
                    .bind(*sku)
                    .fetch_one(&stock)
                    .await
                    .unwrap();
            products.insert((*sku).to_owned(), row);
        }
        let mut balances = BTreeMap::new();
        for (customer, _) in ACCOUNTS {
            let balance: i64 =
                sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
                    .bind(*customer)
                    .fetch_one(&payment)
                    .await
                    .unwrap();
            balances.insert((*customer).to_owned(), balance);
        }
        Effects {
            reserved: by_status(&stock, "reservations", "reserved").await,
            released_with_stock: count(&stock, "SELECT COUNT(*) FROM reservations WHERE status = 'released' AND reservation_id <> ''").await,
            shipments_prepared: by_status(&shipping, "shipments", "prepared").await,
            shipments_cancelled: count(&shipping, "SELECT COUNT(*) FROM shipments WHERE status = 'cancelled' AND shipment_id <> ''").await,
            charged: by_status(&payment, "charges", "charged").await,
            refunded: count(&payment, "SELECT COUNT(*) FROM charges WHERE status = 'refunded' AND payment_id <> ''").await,
            charged_cents: sqlx::query_scalar(
                "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM charges WHERE status = 'charged'",
            )
            .fetch_one(&payment)
            .await
            .unwrap(),
            products,
            balances,
        }
    }
}

/// Effects counted in the domain services' stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Orders holding a stock reservation.
    pub reserved: i64,
    /// Reservations that were made and then released.
    pub released_with_stock: i64,
    pub shipments_prepared: i64,
    /// Shipments that were prepared and then cancelled.
    pub shipments_cancelled: i64,
    pub charged: i64,
    /// Charges that were made and then refunded.
    pub refunded: i64,
    pub charged_cents: i64,
    /// SKU -> (available, reserved).
    pub products: BTreeMap<String, (i64, i64)>,
    /// Customer -> balance in cents.
    pub balances: BTreeMap<String, i64>,
}

impl Effects {
    /// Nothing created or destroyed: stock available plus reserved equals what
    /// was seeded, and money charged plus balances equals what was deposited.
    pub fn assert_conserved(&self) {
        for (sku, _, seeded) in CATALOGUE {
            let (available, reserved) = self.products[*sku];
            assert_eq!(
                available + reserved,
                *seeded,
                "stock of {sku} is not conserved: {self:?}"
            );
        }
        let deposited: i64 = ACCOUNTS.iter().map(|(_, c)| c).sum();
        let balances: i64 = self.balances.values().sum();
        assert_eq!(
            balances + self.charged_cents,
            deposited,
            "money is not conserved: {self:?}"
        );
    }
}

/// Seeds the catalogue and the accounts. Each call has a fixed `request_id`, so
/// retrying through injected faults is safe.
pub async fn seed(stock_url: &str, payment_url: &str) {
    let stock = StockServiceClient::new(channel(stock_url).await);
    for (sku, price, quantity) in CATALOGUE {
        let request = RestockRequest {
            request_id: format!("seed-{sku}"),
            sku: (*sku).into(),
            quantity: *quantity,
            name: format!("Product {sku}"),
            unit_price_cents: *price,
            currency: "EUR".into(),
        };
        // Same request_id on every try: a retry after an injected fault is safe.
        retry(|| {
            let mut stock = stock.clone();
            let request = request.clone();
            async move { stock.restock(admin(request)).await.map(|_| ()) }
        })
        .await;
    }
    let payment = PaymentServiceClient::new(channel(payment_url).await);
    for (customer, cents) in ACCOUNTS {
        let request = DepositRequest {
            request_id: format!("seed-{customer}"),
            customer_id: (*customer).into(),
            amount_cents: *cents,
            currency: "EUR".into(),
        };
        retry(|| {
            let mut payment = payment.clone();
            let request = request.clone();
            async move { payment.deposit(admin(request)).await.map(|_| ()) }
        })
        .await;
    }
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .expect("connect for seeding")
}

async fn by_status(pool: &AnyPool, table: &str, status: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table} WHERE status = '{status}'");
    count(pool, &sql).await
}

async fn count(pool: &AnyPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn retry<F, Fut>(mut call: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    for _ in 0..200 {
        match call().await {
            Ok(()) => return,
            Err(status) if status.code() == tonic::Code::Unavailable => continue,
            Err(status) => panic!("seeding failed: {status:?}"),
        }
    }
    panic!("seeding kept failing");
}

/// The domain services plus an in-process orchestrator.
pub struct System {
    pub services: DomainServices,
    pub orchestrator: Running,
}

impl System {
    pub async fn start(backend: Backend, options: Options) -> System {
        let services = DomainServices::start(backend, &options).await;
        let downstream = services.downstream();
        let engine = options.engine.clone().unwrap_or_default();
        let broker = options.broker.clone().unwrap_or_default();
        let orchestrator = services::orchestrator(backend, move |url| {
            let mut settings = orchestrator::Settings::local(url, API_KEY, downstream);
            settings.engine = engine;
            settings.broker = broker;
            settings
        })
        .await;
        System {
            services,
            orchestrator,
        }
    }

    pub async fn client(&self) -> OrderClient {
        OrderClient::connect(self.orchestrator.endpoint(), API_KEY)
            .await
            .expect("connect to the orchestrator")
    }
}

/// A valid order for `customer`, shipped to `country`.
pub fn order(
    request_id: &str,
    customer: &str,
    items: &[(&str, i64)],
    country: &str,
) -> CreateOrderRequest {
    CreateOrderRequest {
        request_id: request_id.into(),
        customer_id: customer.into(),
        items: items
            .iter()
            .map(|(sku, quantity)| OrderItem {
                sku: (*sku).into(),
                quantity: *quantity,
            })
            .collect(),
        shipping_address: Some(ShippingAddress {
            recipient: "Grace Hopper".into(),
            line1: "1 Navy Yard".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: country.into(),
        }),
        wait: false,
    }
}
