//! Input that was never meant, generated: every request decoder and
//! validator of the four services, and the header and key parsers in front
//! of them, fed with random bytes, mutated valid messages and adversarial
//! fields (control, bidi and zero-width characters, huge and negative
//! numbers, too many lines).
//!
//! Each property holds for every input: nothing panics; a refusal names a
//! field; what is accepted is within the documented bounds and clean of
//! invisible characters. `FUZZ_CASES` sets the cases per property (default
//! 1,000; `.ci/run` runs a deeper bounded pass). A failure prints the
//! smallest input proptest could shrink it to.

use std::time::Duration;

use ordersaga_proto::{
    orders::v1::{
        CancelOrderRequest, CreateOrderRequest, GetOrderRequest, ListOrdersRequest, OrderItem,
        ResolveCompensationRequest, RetryCompensationRequest, ShippingAddress, WatchOrderRequest,
    },
    payment::v1::{ChargeRequest, DepositRequest, GetAccountRequest, RefundRequest},
    shipping::v1::{Address, CancelShipmentRequest, GetShipmentRequest, PrepareShipmentRequest},
    stock::v1::{
        GetProductRequest, ListProductsRequest, OrderLine, ReleaseStockRequest,
        ReserveStockRequest, RestockRequest,
    },
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestRunner},
};
use prost::Message;
use svc_kit::{Error, validate};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Runs `property` over `strategy` for [`cases`] inputs, failing with the
/// shrunk input.
fn check<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value)) {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |value| {
        property(value);
        Ok(())
    });
    if let Err(err) = result {
        panic!("{name}: {err}");
    }
}

/// Characters that break things: invisible format characters, controls,
/// surrogates' neighbours, and plain text around them.
fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => proptest::char::range('0', '9'),
        1 => Just('-'),
        1 => prop::sample::select(vec![
            '\u{0}', '\n', '\r', '\t', '\u{7f}', '\u{85}', '\u{AD}', '\u{200B}', '\u{200D}',
            '\u{200E}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{FEFF}', '\u{E0041}', '\u{FFFD}',
            'é', 'ß', '漢', '🦀', ' ',
        ]),
        1 => any::<char>(),
    ]
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(nasty_char(), 0..24).prop_map(String::from_iter),
        1 => prop::collection::vec(nasty_char(), 0..max).prop_map(String::from_iter),
        1 => Just(String::new()),
    ]
}

fn uuid_like() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(()).prop_map(|_| uuid::Uuid::new_v4().to_string()),
        1 => text(64),
    ]
}

fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => -5i64..20_000,
        1 => prop::sample::select(vec![0, -1, i64::MIN, i64::MAX, 10_001, 1_000_000_000_001]),
        1 => any::<i64>(),
    ]
}

fn country() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["DE", "FR", "US", "de", "XX", "D", "DEU"])
            .prop_map(str::to_owned),
        1 => text(4),
    ]
}

fn currency() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["EUR", "USD", "eur", "EU", "EURO"]).prop_map(str::to_owned),
        1 => text(4),
    ]
}

fn order_address() -> impl Strategy<Value = Option<ShippingAddress>> {
    prop::option::weighted(
        0.9,
        (text(220), text(220), text(120), text(30), country()).prop_map(
            |(recipient, line1, city, postal_code, country)| ShippingAddress {
                recipient,
                line1,
                city,
                postal_code,
                country,
            },
        ),
    )
}

/// Mostly a few adversarial entries; sometimes a plain list around the
/// limit of 100 (built cheaply: only its length matters there).
fn lines<T: std::fmt::Debug + Clone>(
    one: impl Strategy<Value = T> + 'static,
    plain: fn(usize) -> T,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        4 => prop::collection::vec(one, 0..5),
        1 => (95usize..110).prop_map(move |n| (0..n).map(plain).collect()),
    ]
}

fn create_order() -> impl Strategy<Value = CreateOrderRequest> {
    let item = (text(140), number()).prop_map(|(sku, quantity)| OrderItem { sku, quantity });
    let plain = |i: usize| OrderItem {
        sku: format!("SKU-{i}"),
        quantity: 1,
    };
    (
        text(140),
        text(140),
        lines(item, plain),
        order_address(),
        any::<bool>(),
    )
        .prop_map(|(request_id, customer_id, items, shipping_address, wait)| {
            CreateOrderRequest {
                request_id,
                customer_id,
                items,
                shipping_address,
                wait,
            }
        })
}

fn reserve_stock() -> impl Strategy<Value = ReserveStockRequest> {
    let line = (text(140), number(), number(), currency()).prop_map(
        |(sku, quantity, expected_unit_price_cents, expected_currency)| OrderLine {
            sku,
            quantity,
            expected_unit_price_cents,
            expected_currency,
        },
    );
    let plain = |i: usize| OrderLine {
        sku: format!("SKU-{i}"),
        quantity: 1,
        expected_unit_price_cents: 0,
        expected_currency: String::new(),
    };
    (text(140), uuid_like(), lines(line, plain)).prop_map(|(request_id, order_id, lines)| {
        ReserveStockRequest {
            request_id,
            order_id,
            lines,
        }
    })
}

fn restock() -> impl Strategy<Value = RestockRequest> {
    (
        text(140),
        text(140),
        number(),
        text(220),
        number(),
        currency(),
    )
        .prop_map(
            |(request_id, sku, quantity, name, unit_price_cents, currency)| RestockRequest {
                request_id,
                sku,
                quantity,
                name,
                unit_price_cents,
                currency,
            },
        )
}

fn prepare_shipment() -> impl Strategy<Value = PrepareShipmentRequest> {
    let address = prop::option::weighted(
        0.9,
        (text(220), text(220), text(120), text(30), country()).prop_map(
            |(recipient, line1, city, postal_code, country)| Address {
                recipient,
                line1,
                city,
                postal_code,
                country,
            },
        ),
    );
    (text(140), uuid_like(), address, -2i32..6, number()).prop_map(
        |(request_id, order_id, address, service_level, item_count)| PrepareShipmentRequest {
            request_id,
            order_id,
            address,
            service_level,
            item_count,
        },
    )
}

fn charge() -> impl Strategy<Value = ChargeRequest> {
    (text(140), uuid_like(), text(140), number(), currency()).prop_map(
        |(request_id, order_id, customer_id, amount_cents, currency)| ChargeRequest {
            request_id,
            order_id,
            customer_id,
            amount_cents,
            currency,
        },
    )
}

/// A refusal says which field: INVALID_ARGUMENT with a non-empty field.
fn names_a_field(err: &Error) {
    match err {
        Error::InvalidArgument { field, reason } => {
            assert!(!field.is_empty() && !reason.is_empty(), "{err:?}")
        }
        other => panic!("validation answered something else than INVALID_ARGUMENT: {other:?}"),
    }
}

/// What an accepted field must be: bounded and free of what a reader can't see.
fn clean(field: &str, value: &str, max_chars: usize) {
    assert!(!value.trim().is_empty(), "{field} accepted empty");
    assert!(
        value.chars().count() <= max_chars,
        "{field} accepted {} characters",
        value.chars().count()
    );
    assert!(
        !value.chars().any(|c| c.is_control() || validate::unseen(c)),
        "{field} accepted {value:?}"
    );
}

fn unique<'a>(skus: impl Iterator<Item = &'a str>) -> bool {
    let mut seen = std::collections::HashSet::new();
    skus.into_iter().all(|sku| seen.insert(sku))
}

#[test]
fn create_order_validation_refuses_by_field_and_accepts_only_clean_bounded_orders() {
    check(
        "CreateOrder",
        create_order(),
        |req| match orchestrator::orders::validate::create(&req) {
            Err(err) => names_a_field(&err),
            Ok(order) => {
                clean("request_id", &order.request_id, 128);
                clean("customer_id", &order.customer_id, 128);
                assert!((1..=validate::MAX_LINES).contains(&order.items.len()));
                for (sku, quantity) in &order.items {
                    clean("sku", sku, 128);
                    assert!((1..=validate::MAX_LINE_QUANTITY).contains(quantity));
                }
                assert!(unique(order.items.iter().map(|(sku, _)| sku.as_str())));
                clean("recipient", &order.address.recipient, 200);
                clean("line1", &order.address.line1, 200);
                clean("city", &order.address.city, 100);
                clean("postal_code", &order.address.postal_code, 20);
                clean("country", &order.address.country, 2);
            }
        },
    );
}

#[test]
fn stock_validation_refuses_by_field_and_accepts_only_clean_bounded_requests() {
    check(
        "ReserveStock",
        reserve_stock(),
        |req| match stock_svc::api::validate_reserve(&req) {
            Err(err) => names_a_field(&err),
            Ok(lines) => {
                clean("request_id", &req.request_id, 128);
                assert!(uuid::Uuid::parse_str(&req.order_id).is_ok());
                assert!((1..=validate::MAX_LINES).contains(&lines.len()));
                for line in &lines {
                    clean("sku", &line.sku, 128);
                    assert!((1..=validate::MAX_LINE_QUANTITY).contains(&line.quantity));
                    if let Some((cents, currency)) = &line.expected_price {
                        assert!((1..=validate::MAX_AMOUNT_CENTS).contains(cents));
                        clean("currency", currency, 3);
                    }
                }
                assert!(unique(lines.iter().map(|l| l.sku.as_str())));
            }
        },
    );
    check(
        "Restock",
        restock(),
        |req| match stock_svc::api::validate_restock(&req) {
            Err(err) => names_a_field(&err),
            Ok(restock) => {
                clean("sku", &restock.sku, 128);
                assert!(restock.quantity >= 1, "{}", restock.quantity);
                if let Some(product) = &restock.new_product {
                    clean("name", &product.name, 200);
                    clean("currency", &product.currency, 3);
                    assert!((1..=validate::MAX_AMOUNT_CENTS).contains(&product.unit_price_cents));
                }
            }
        },
    );
}

#[test]
fn shipping_and_payment_validation_refuse_by_field_and_accept_only_clean_requests() {
    check(
        "PrepareShipment",
        prepare_shipment(),
        |req| match shipping_svc::api::validate_prepare(&req) {
            Err(err) => names_a_field(&err),
            Ok(shipment) => {
                assert!(uuid::Uuid::parse_str(&shipment.order_id).is_ok());
                clean("recipient", &shipment.address.recipient, 200);
                clean("line1", &shipment.address.line1, 200);
                clean("city", &shipment.address.city, 100);
                clean("postal_code", &shipment.address.postal_code, 20);
                clean("country", &shipment.address.country, 2);
                assert!(shipment.item_count >= 1);
            }
        },
    );
    check(
        "Charge",
        charge(),
        |req| match payment_svc::api::validate_charge(&req) {
            Err(err) => names_a_field(&err),
            Ok(charge) => {
                assert!(uuid::Uuid::parse_str(&charge.order_id).is_ok());
                clean("customer_id", &charge.customer_id, 128);
                clean("currency", &charge.currency, 3);
                assert!((1..=validate::MAX_AMOUNT_CENTS).contains(&charge.amount_cents));
            }
        },
    );
}

/// Decodes `bytes` as every request of the contract, and validates what
/// decodes where a validator exists. Nothing may panic.
fn decode_everything(bytes: &[u8]) {
    if let Ok(req) = CreateOrderRequest::decode(bytes) {
        let _ = orchestrator::orders::validate::create(&req);
    }
    if let Ok(req) = ListOrdersRequest::decode(bytes) {
        let _ = orchestrator::orders::validate::status_filter(&req.statuses);
    }
    if let Ok(req) = ReserveStockRequest::decode(bytes) {
        let _ = stock_svc::api::validate_reserve(&req);
    }
    if let Ok(req) = RestockRequest::decode(bytes) {
        let _ = stock_svc::api::validate_restock(&req);
    }
    if let Ok(req) = PrepareShipmentRequest::decode(bytes) {
        let _ = shipping_svc::api::validate_prepare(&req);
    }
    if let Ok(req) = ChargeRequest::decode(bytes) {
        let _ = payment_svc::api::validate_charge(&req);
    }
    // The rest are IDs checked field by field in their handlers.
    let _ = GetOrderRequest::decode(bytes);
    let _ = WatchOrderRequest::decode(bytes);
    let _ = CancelOrderRequest::decode(bytes);
    let _ = RetryCompensationRequest::decode(bytes);
    let _ = ResolveCompensationRequest::decode(bytes);
    let _ = ReleaseStockRequest::decode(bytes);
    let _ = GetProductRequest::decode(bytes);
    let _ = ListProductsRequest::decode(bytes);
    let _ = CancelShipmentRequest::decode(bytes);
    let _ = GetShipmentRequest::decode(bytes);
    let _ = RefundRequest::decode(bytes);
    let _ = GetAccountRequest::decode(bytes);
    let _ = DepositRequest::decode(bytes);
}

#[test]
fn random_and_mutated_bytes_decode_and_validate_without_a_panic() {
    check(
        "random bytes",
        prop::collection::vec(any::<u8>(), 0..2_048),
        |bytes| decode_everything(&bytes),
    );
    // Valid messages with bytes flipped, cut and spliced: past the first
    // byte, where random bytes rarely get.
    let valid = prop_oneof![
        create_order().prop_map(|m| m.encode_to_vec()),
        reserve_stock().prop_map(|m| m.encode_to_vec()),
        prepare_shipment().prop_map(|m| m.encode_to_vec()),
        charge().prop_map(|m| m.encode_to_vec()),
        restock().prop_map(|m| m.encode_to_vec()),
    ];
    let edits = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8);
    check(
        "mutated messages",
        (valid, edits, any::<prop::sample::Index>()),
        |(mut bytes, edits, cut)| {
            if bytes.is_empty() {
                return;
            }
            for (at, value) in edits {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            decode_everything(&bytes);
            decode_everything(&bytes[..cut.index(bytes.len())]);
        },
    );
}

#[test]
fn headers_and_keys_parse_any_value_without_a_panic() {
    check("grpc-timeout", text(24), |value| {
        let _ = svc_kit::grpc_timeout::parse(&value);
    });
    check("grpc-timeout digits", "[0-9]{0,20}[HMSmun]?", |value| {
        if let Some(timeout) = svc_kit::grpc_timeout::parse(&value) {
            let again = svc_kit::grpc_timeout::format(timeout);
            assert!(svc_kit::grpc_timeout::parse(&again).is_some_and(|t| t <= timeout));
        }
    });
    check(
        "grpc-timeout round trip",
        any::<u64>().prop_map(Duration::from_nanos),
        |timeout| {
            let back = svc_kit::grpc_timeout::parse(&svc_kit::grpc_timeout::format(timeout));
            assert!(
                back.is_some_and(|b| b <= timeout),
                "{timeout:?} -> {back:?}"
            );
        },
    );
    let keys = svc_kit::auth::KeySet::new(["a-business-key-0123456789abcdef0123"]);
    check(
        "x-api-key",
        prop::collection::vec(any::<u8>(), 0..256),
        |given| {
            assert!(!keys.contains(&given) || given == b"a-business-key-0123456789abcdef0123");
        },
    );
}
