//! Input at the edge that was never meant: requests larger than any valid
//! one, and text a reader cannot see.

use ordersaga_tests::{
    Backend,
    system::{Options, System, order},
};
use tonic::Code;

use crate::assertions::request_id;

/// A request larger than any valid one (64 KiB) is refused before it is
/// decoded; the largest valid one is decoded and answered on its merits.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_larger_than_any_valid_one_is_refused_undecoded() {
    let system = System::start(Backend::Sqlite, Options::default()).await;
    let client = system.client().await;

    let huge = order(&request_id(), &"a".repeat(100 * 1024), &[("BOOK", 1)], "DE");
    let refused = client.create_order(huge).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Code::OutOfRange,
        "a 100 KiB request must not be decoded: {refused:?}"
    );
    assert!(refused.message().contains("too large"), "{refused:?}");

    // The largest valid request: 100 lines of 64-byte SKUs, long address.
    let mut largest = order(&"r".repeat(128), &"c".repeat(128), &[], "DE");
    largest.items = (0..100)
        .map(|i| ordersaga_proto::orders::v1::OrderItem {
            sku: format!("{i:0>64}"),
            quantity: 10_000,
        })
        .collect();
    let address = largest.shipping_address.as_mut().unwrap();
    address.recipient = "é".repeat(200);
    address.line1 = "é".repeat(200);
    address.city = "é".repeat(100);
    let answered = client.create_order(largest).await.unwrap_err();
    assert_ne!(
        answered.code(),
        Code::OutOfRange,
        "the largest valid request was refused for its size: {answered:?}"
    );
    // The system still works.
    client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
}

/// IDs, names and a cancel's reason may not hold characters a reader does
/// not see: bidi overrides, zero-width characters. The field is named.
#[tokio::test(flavor = "multi_thread")]
async fn invisible_characters_are_refused_naming_the_field() {
    let system = System::start(Backend::Sqlite, Options::default()).await;
    let client = system.client().await;

    let spoofed = order(&request_id(), "ali\u{202E}ecil", &[("BOOK", 1)], "DE");
    let refused = client.create_order(spoofed).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("customer_id") && refused.message().contains("U+202E"),
        "{refused:?}"
    );

    let zero_width = order(
        &format!("{}\u{200B}", request_id()),
        "alice",
        &[("BOOK", 1)],
        "DE",
    );
    let refused = client.create_order(zero_width).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("request_id"), "{refused:?}");

    let placed = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "DE"))
        .await
        .unwrap();
    let refused = client
        .cancel_order(&placed.order_id, request_id(), "oops\u{2067}")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("reason"), "{refused:?}");
}

/// Sends raw bytes as a gRPC message and takes raw bytes back.
#[derive(Debug, Default, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = bytes::Buf::copy_to_bytes(src, bytes::Buf::remaining(src));
        Ok(Some(bytes.to_vec()))
    }
}

/// Appends `value` as a protobuf varint.
fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A small deterministic generator (xorshift), so a failure replays.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Text a caller should never send: empty, huge, control and invisible
    /// characters, look-alike IDs, numbers.
    fn nasty_text(&mut self) -> String {
        const PIECES: &[&str] = &[
            "",
            " ",
            "\0",
            "\u{7}",
            "\u{202E}",
            "\u{200B}",
            "\u{FEFF}",
            "é",
            "東",
            "-1",
            "9999999999999999999",
            "00000000-0000-0000-0000-000000000000",
            "BOOK",
            "EUR",
            "DE",
            "alice",
            "'; DROP TABLE orders; --",
            "%s%n",
            "\u{10FFFF}",
        ];
        let mut text = String::new();
        for _ in 0..self.below(6) {
            text.push_str(PIECES[self.below(PIECES.len() as u64) as usize]);
        }
        if self.below(20) == 0 {
            text.push_str(&"x".repeat(self.below(5_000) as usize));
        }
        text
    }

    /// Either random bytes, or a message that decodes: random fields of
    /// every wire type with nasty values.
    fn request(&mut self) -> Vec<u8> {
        let mut out = vec![];
        if self.below(3) == 0 {
            for _ in 0..self.below(64) {
                out.push(self.next() as u8);
            }
            return out;
        }
        for _ in 0..self.below(10) {
            let field = 1 + self.below(12);
            match self.below(4) {
                0 => {
                    varint(&mut out, field << 3);
                    let value = match self.below(3) {
                        0 => self.next(),
                        1 => u64::MAX,
                        _ => self.below(20_000),
                    };
                    varint(&mut out, value);
                }
                1 | 2 => {
                    varint(&mut out, (field << 3) | 2);
                    let text = if self.below(4) == 0 {
                        // A nested message: a string in field 1.
                        let inner = self.nasty_text();
                        let mut nested = vec![0x0a];
                        varint(&mut nested, inner.len() as u64);
                        nested.extend_from_slice(inner.as_bytes());
                        nested
                    } else {
                        self.nasty_text().into_bytes()
                    };
                    varint(&mut out, text.len() as u64);
                    out.extend_from_slice(&text);
                }
                _ => {
                    // A truncated or impossible field.
                    let wire_type = self.below(8);
                    varint(&mut out, (field << 3) | wire_type);
                    out.push(self.next() as u8);
                }
            }
        }
        out
    }
}

/// Rows in every table of a store but the migrations' own.
async fn rows(pool: &sqlx::AnyPool) -> i64 {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx%'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut total = 0;
    for table in tables {
        let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM \"{table}\""
        )))
        .fetch_one(pool)
        .await
        .unwrap();
        total += count;
    }
    total
}

/// 10,000 malformed or random requests to each service, with the right key
/// so that they reach the decoders and the validation: every one is
/// answered, nothing is written, and every service still works after.
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_malformed_requests_to_each_service_write_nothing() {
    let system = System::start(Backend::Sqlite, Options::default()).await;
    let targets: [(&ordersaga_tests::services::Running, &[&str]); 4] = [
        (
            &system.orchestrator,
            &[
                "orders.v1.OrderService/CreateOrder",
                "orders.v1.OrderService/GetOrder",
                "orders.v1.OrderService/ListOrders",
                "orders.v1.OrderService/CancelOrder",
            ],
        ),
        (
            &system.services.stock,
            &[
                "stock.v1.StockService/ReserveStock",
                "stock.v1.StockService/ReserveStockBatch",
                "stock.v1.StockService/ReleaseStock",
                "stock.v1.StockService/GetProduct",
                "stock.v1.StockService/ListProducts",
                "stock.v1.StockService/Restock",
            ],
        ),
        (
            &system.services.shipping,
            &[
                "shipping.v1.ShippingService/PrepareShipment",
                "shipping.v1.ShippingService/PrepareShipmentBatch",
                "shipping.v1.ShippingService/CancelShipment",
                "shipping.v1.ShippingService/GetShipment",
            ],
        ),
        (
            &system.services.payment,
            &[
                "payment.v1.PaymentService/Charge",
                "payment.v1.PaymentService/ChargeBatch",
                "payment.v1.PaymentService/Refund",
                "payment.v1.PaymentService/GetAccount",
                "payment.v1.PaymentService/Deposit",
            ],
        ),
    ];
    let mut before = vec![];
    for (service, _) in &targets {
        before.push(rows(&service.db.pool().await).await);
    }
    let mut random = Random(0x5eed_2026_1201);
    let mut codes: std::collections::BTreeMap<String, u32> = Default::default();
    for (service, methods) in &targets {
        for _ in 0..20 {
            // A connection per 500 calls, as many clients would open.
            let channel = service.channel().await;
            let calls = (0..500).map(|_| {
                let method = methods[random.below(methods.len() as u64) as usize];
                let body = random.request();
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                async move {
                    grpc.ready().await.unwrap();
                    let mut request = tonic::Request::new(body);
                    // Each method with the key of its scope, so that the bytes
                    // reach decoding and validation.
                    let key =
                        if svc_kit::auth::ADMIN_METHODS.contains(&format!("/{method}").as_str()) {
                            ordersaga_tests::ADMIN_KEY
                        } else {
                            ordersaga_tests::API_KEY
                        };
                    request
                        .metadata_mut()
                        .insert("x-api-key", key.parse().unwrap());
                    let path = http::uri::PathAndQuery::try_from(format!("/{method}")).unwrap();
                    (method, grpc.unary(request, path, RawCodec).await)
                }
            });
            for (method, answer) in futures::future::join_all(calls).await {
                let code = answer.as_ref().err().map_or(Code::Ok, tonic::Status::code);
                *codes.entry(format!("{code:?}")).or_default() += 1;
                if let Err(status) = answer {
                    assert!(
                        !matches!(status.code(), Code::Unknown | Code::Unavailable),
                        "{method}: the service failed instead of refusing: {status:?}"
                    );
                }
            }
        }
    }
    // Both ways in were taken: bytes that do not decode, and messages that
    // decode and are refused by validation.
    println!("answers to 40,000 malformed requests: {codes:?}");
    assert!(
        codes.get("Internal").copied().unwrap_or(0) > 1_000,
        "{codes:?}"
    );
    assert!(
        codes.get("InvalidArgument").copied().unwrap_or(0) > 1_000,
        "{codes:?}"
    );
    for ((service, _), before) in targets.iter().zip(before) {
        assert_eq!(
            rows(&service.db.pool().await).await,
            before,
            "a malformed request wrote to {}",
            service.endpoint()
        );
    }
    // Every service still answers real calls.
    let client = system.client().await;
    let placed = client
        .create_order_and_wait(
            order(&request_id(), "alice", &[("BOOK", 1)], "DE"),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(
        ordersaga_proto::orders::v1::OrderStatus::try_from(placed.status),
        Ok(ordersaga_proto::orders::v1::OrderStatus::Completed)
    );
}
