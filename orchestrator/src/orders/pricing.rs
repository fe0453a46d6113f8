//! Prices an order from the stock service's catalogue before it is recorded, so
//! the order (and the amount the saga will charge) is fixed from the start.
//!
//! Prices are kept for a while ([`PRICE_TTL`]) instead of asked for on every
//! order: the lookup was one RPC (and one read in the stock service) per
//! order. A kept price may be stale, so it is checked where it counts: the
//! reserve step sends the price each line was priced at, and the stock
//! service refuses the reservation (FAILED_PRECONDITION, "price changed") if
//! its catalogue says otherwise, in the same statement that takes the stock.
//! An order is never charged a price the catalogue no longer has; the refused
//! order fails with nothing taken, and the step drops the order's SKUs from
//! the cache, so the next order is priced afresh.
//!
//! Lookups share the stock link with the sagas' own calls (reserve, release),
//! so they get a budget of their own ([`Catalogue::new`]): orders full of
//! SKUs nobody cached (or that do not exist) cannot take every slot of the
//! link and starve the reservations and compensations of sagas under way.
//! Orders that need the same SKU at once share one lookup, so a burst of
//! orders for a product nobody has priced yet makes one call, not one each.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared, try_join_all},
};
use ordersaga_proto::stock::v1::{GetProductRequest, Product};
use saga_engine::retry::{Answer, classify};
use tokio::sync::Semaphore;
use tonic::{Code, Request, Status};
use tracing::Instrument;

use crate::{downstream::StockClient, error::OrderError, order_saga::PricedItem};

/// Lookups are reads, so transient failures are retried a few times before
/// the client is told to retry.
const LOOKUP_ATTEMPTS: u32 = 4;

/// How long a looked-up price is used without asking again.
pub const PRICE_TTL: Duration = Duration::from_secs(60);

/// Longest wait for a lookup's turn within the pricing budget.
const LOOKUP_QUEUE_WAIT: Duration = Duration::from_secs(5);

/// Past this many SKUs the cache starts afresh (a bound on memory).
const MAX_CACHED: usize = 100_000;

/// A product's price, as the catalogue gave it.
#[derive(Debug, Clone)]
struct Price {
    unit_price_cents: i64,
    currency: String,
    fetched: Instant,
}

/// The catalogue's prices, looked up through the stock service and kept for
/// [`PRICE_TTL`].
pub struct Catalogue {
    stock: StockClient,
    prices: Arc<Mutex<Prices>>,
    /// Lookups in flight at once: a share of the stock link, not all of it.
    lookups: Arc<Semaphore>,
    /// The lookup under way for each SKU, which every order that needs the
    /// SKU meanwhile awaits.
    in_flight: Arc<Mutex<HashMap<String, Lookup>>>,
}

type Lookup = Shared<BoxFuture<'static, Result<Price, Status>>>;

/// The kept prices, and when each SKU was last forgotten: a lookup that began
/// before that may carry the stale price, so its answer is not kept.
#[derive(Default)]
struct Prices {
    kept: HashMap<String, Price>,
    forgotten: HashMap<String, Instant>,
}

impl Prices {
    fn get(&self, sku: &str) -> Option<Price> {
        self.kept
            .get(sku)
            .filter(|p| p.fetched.elapsed() < PRICE_TTL)
            .cloned()
    }

    fn forget(&mut self, sku: &str) {
        self.kept.remove(sku);
        self.forgotten.insert(sku.to_owned(), Instant::now());
    }

    /// Keeps a price looked up from `price.fetched` on, unless the SKU was
    /// forgotten meanwhile.
    fn keep(&mut self, sku: &str, price: Price) {
        if self
            .forgotten
            .get(sku)
            .is_some_and(|at| *at >= price.fetched)
        {
            return;
        }
        if self.kept.len() >= MAX_CACHED {
            self.kept.clear();
        }
        if self.forgotten.len() >= MAX_CACHED {
            self.forgotten.clear();
        }
        self.kept.insert(sku.to_owned(), price);
    }
}

impl Catalogue {
    /// At most `max_lookups` lookups in flight at once.
    pub fn new(stock: StockClient, max_lookups: usize) -> Self {
        Catalogue {
            stock,
            prices: Arc::default(),
            lookups: Arc::new(Semaphore::new(max_lookups)),
            in_flight: Arc::default(),
        }
    }

    /// Drops these SKUs' prices: the stock service said one of them changed.
    pub fn forget<'a>(&self, skus: impl IntoIterator<Item = &'a str>) {
        let mut prices = self.prices.lock().unwrap();
        for sku in skus {
            prices.forget(sku);
        }
    }

    /// The price of one SKU: kept, or looked up (or being looked up).
    async fn price_of(&self, sku: &str) -> Result<Price, Status> {
        if let Some(price) = self.prices.lock().unwrap().get(sku) {
            return Ok(price);
        }
        let lookup = self
            .in_flight
            .lock()
            .unwrap()
            .entry(sku.to_owned())
            .or_insert_with(|| self.look_up(sku.to_owned()))
            .clone();
        lookup.await
    }

    /// One lookup of `sku`, within the budget; its price kept, then it
    /// leaves `in_flight`. It runs on a task of its own, which the orders
    /// awaiting it share: they may all be dropped (their clients left,
    /// their deadlines passed), and a lookup that nobody polled any more
    /// kept its turn of the budget and its slot on the stock link until an
    /// order for the same SKU came, perhaps never. Still waiting for its
    /// turn, it was even handed the next turn freed (tokio's semaphore
    /// serves its queue in order, polled or not): after a few such orders
    /// every order that needed a lookup was refused "pricing is busy" until
    /// a restart. On its own task it ends within its own timeouts.
    fn look_up(&self, sku: String) -> Lookup {
        let work = look_up_now(
            self.stock.clone(),
            self.lookups.clone(),
            self.prices.clone(),
            self.in_flight.clone(),
            sku,
        );
        // In the span of the order that asked first, as before: its
        // `GetProduct` call joins that order's trace.
        let lookup = tokio::spawn(work.instrument(tracing::Span::current()));
        async move {
            lookup.await.unwrap_or_else(|err| {
                Err(Status::internal(format!("the price lookup failed: {err}")))
            })
        }
        .boxed()
        .shared()
    }
}

/// [`Catalogue::look_up`]'s task: waits for a turn of the budget, looks
/// `sku` up and keeps its price; then it leaves `in_flight`.
async fn look_up_now(
    mut stock: StockClient,
    lookups: Arc<Semaphore>,
    prices: Arc<Mutex<Prices>>,
    in_flight: Arc<Mutex<HashMap<String, Lookup>>>,
    sku: String,
) -> Result<Price, Status> {
    let _leaves = LeavesInFlight(&in_flight, &sku);
    let _turn = tokio::time::timeout(LOOKUP_QUEUE_WAIT, lookups.acquire())
        .await
        .map_err(|_| {
            Status::unavailable(
                "pricing is busy (PRICING_MAX_CONCURRENT_LOOKUPS lookups in flight); retry",
            )
        })?
        .map_err(|_| Status::unavailable("pricing is shutting down"))?;
    let asked = Instant::now();
    let product = lookup(&mut stock, &sku).await?;
    let price = Price {
        unit_price_cents: product.unit_price_cents,
        currency: product.currency,
        fetched: asked,
    };
    prices.lock().unwrap().keep(&sku, price.clone());
    Ok(price)
}

/// Takes a lookup out of `in_flight` when it ends, however it ends (a panic
/// included): an entry left behind would answer its SKU's orders with that
/// lookup's end until a restart.
struct LeavesInFlight<'a>(&'a Mutex<HashMap<String, Lookup>>, &'a str);

impl Drop for LeavesInFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.0.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.remove(self.1);
    }
}

/// The priced items, their total and their currency.
pub async fn price(
    catalogue: &Catalogue,
    items: &[(String, i64)],
) -> Result<(Vec<PricedItem>, i64, String), OrderError> {
    let lookups = items
        .iter()
        .enumerate()
        .map(|(i, (sku, quantity))| async move {
            match catalogue.price_of(sku).await {
                Ok(price) => Ok((
                    PricedItem {
                        sku: sku.clone(),
                        quantity: *quantity,
                        unit_price_cents: price.unit_price_cents,
                    },
                    price.currency,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn price(cents: i64, fetched: Instant) -> Price {
        Price {
            unit_price_cents: cents,
            currency: "EUR".into(),
            fetched,
        }
    }

    #[test]
    fn a_lookup_that_began_before_a_forget_is_not_kept() {
        let mut prices = Prices::default();
        let asked = Instant::now();
        // The stock service refuses a stale price while this lookup is out.
        prices.forget("BOOK");
        prices.keep("BOOK", price(1_500, asked));
        assert!(prices.get("BOOK").is_none(), "a stale answer was kept");
        // A lookup that began after it is kept.
        prices.keep("BOOK", price(1_750, Instant::now()));
        assert_eq!(prices.get("BOOK").unwrap().unit_price_cents, 1_750);
    }

    #[test]
    fn a_price_is_used_for_its_time_to_live_only() {
        let mut prices = Prices::default();
        let Some(long_ago) = Instant::now().checked_sub(PRICE_TTL) else {
            return; // a clock this young can't express it
        };
        prices.keep("BOOK", price(1_500, long_ago));
        assert!(prices.get("BOOK").is_none());
    }
}
