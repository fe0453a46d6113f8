//! The reasons behind a refusal, typed: every service's definite refusal
//! carries a `google.rpc.ErrorInfo` (a stable reason and its domain, the
//! proto package) and a malformed request a `google.rpc.BadRequest` naming
//! the field, besides the English message. Branch on these, not on the text.
//!
//! ```
//! use ordersaga_proto::errors::{Reason, refusal};
//! # let status = tonic::Status::failed_precondition("insufficient funds");
//! match refusal(&status).map(|r| r.reason) {
//!     Some(Reason::InsufficientFunds) => { /* ask for another card */ }
//!     Some(Reason::OutOfStock) => { /* offer a later date */ }
//!     _ => { /* status.code() still says what to do */ }
//! }
//! ```

use tonic::Status;
use tonic_types::StatusExt;

/// Why a call was refused, from its `ErrorInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    /// The package whose rule refused it: `orders.v1`, `stock.v1`,
    /// `shipping.v1`, `payment.v1`, or `ordersaga` for the shared ones.
    pub domain: String,
}

macro_rules! reasons {
    ($($variant:ident = $name:literal: $doc:literal,)*) => {
        /// Every reason the system gives. A reason this build does not know
        /// (from a newer server) is [`Reason::Other`].
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Reason {
            $(#[doc = $doc] $variant,)*
            Other(String),
        }

        impl Reason {
            pub fn parse(name: &str) -> Reason {
                match name {
                    $($name => Reason::$variant,)*
                    other => Reason::Other(other.to_owned()),
                }
            }

            pub fn as_str(&self) -> &str {
                match self {
                    $(Reason::$variant => $name,)*
                    Reason::Other(name) => name,
                }
            }

            /// Every reason this build knows, by name.
            pub const ALL: &[&str] = &[$($name),*];
        }
    };
}

reasons! {
    RequestIdReused = "REQUEST_ID_REUSED": "The request_id was used for another request.",
    ApiKeyMissing = "API_KEY_MISSING": "No x-api-key was sent.",
    ApiKeyInvalid = "API_KEY_INVALID": "The x-api-key matches no key.",
    AdminKeyRequired = "ADMIN_KEY_REQUIRED": "An admin RPC was called with the business key.",
    AdminRpcsOff = "ADMIN_RPCS_OFF": "The service has no admin key: admin RPCs are off.",
    BusinessKeyRequired = "BUSINESS_KEY_REQUIRED": "A business RPC was called with the admin key.",
    Overloaded = "OVERLOADED": "Too many calls in flight (MAX_CONCURRENT_CALLS); retry with backoff.",
    UnknownSku = "UNKNOWN_SKU": "No product has this SKU.",
    NewSkuIncomplete = "NEW_SKU_INCOMPLETE": "A restock of a new SKU lacks its name, price or currency.",
    OutOfStock = "OUT_OF_STOCK": "Not enough units are available.",
    PriceChanged = "PRICE_CHANGED": "The catalogue's price is no longer the one the order was priced at.",
    MixedCurrencies = "MIXED_CURRENCIES": "The items are priced in different currencies.",
    AlreadyReleased = "ALREADY_RELEASED": "The order's stock was released before it was reserved.",
    AlreadyReserved = "ALREADY_RESERVED": "The order already holds a reservation.",
    NoReservation = "NO_RESERVATION": "The stock service never saw the order.",
    UnknownAccount = "UNKNOWN_ACCOUNT": "No account for this customer.",
    InsufficientFunds = "INSUFFICIENT_FUNDS": "The account's balance does not cover the charge.",
    CurrencyMismatch = "CURRENCY_MISMATCH": "The account is in another currency.",
    AlreadyRefunded = "ALREADY_REFUNDED": "The order was refunded before it was charged.",
    AlreadyCharged = "ALREADY_CHARGED": "The order was already charged.",
    NoPayment = "NO_PAYMENT": "The payment service never saw the order.",
    NoShipment = "NO_SHIPMENT": "The order has no shipment.",
    CountryNotServed = "COUNTRY_NOT_SERVED": "The shipping service does not ship there.",
    AlreadyCancelled = "ALREADY_CANCELLED": "The shipment was cancelled before it was prepared.",
    AlreadyPrepared = "ALREADY_PREPARED": "The order already has a shipment.",
    OrderNotFound = "ORDER_NOT_FOUND": "No order has this ID.",
    NotCancellable = "NOT_CANCELLABLE": "The order can no longer be cancelled (charged, or ended).",
    NotNeedingAttention = "NOT_NEEDING_ATTENTION": "An operator action on an order that does not rest NEEDS_ATTENTION.",
    PricingUnavailable = "PRICING_UNAVAILABLE": "The order could not be priced: the stock service is unavailable.",
    TooManyWaitingSagas = "TOO_MANY_WAITING_SAGAS": "Too many orders wait for a saga slot (MAX_WAITING_SAGAS); the call did nothing: retry with backoff and the same request_id.",
    TooManyWatches = "TOO_MANY_WATCHES": "Too many WatchOrder streams are open (MAX_WATCH_STREAMS…).",
}

/// The refusal's reason and domain, when the status carries an `ErrorInfo`.
pub fn refusal(status: &Status) -> Option<Refusal> {
    let info = status.get_details_error_info()?;
    Some(Refusal {
        reason: Reason::parse(&info.reason),
        domain: info.domain,
    })
}

/// The fields a malformed request got wrong (`BadRequest`): each field's
/// path, e.g. `shipping_address.country`, and what is wrong with it.
pub fn field_violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}
