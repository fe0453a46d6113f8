//! A thin typed client over `orders.v1.OrderService`, so a Rust program can use
//! this crate as an SDK without handling `x-api-key` metadata or response
//! envelopes itself.
//!
//! It only removes boilerplate: every method maps to one RPC, and errors are the
//! server's [`Status`] unchanged, so callers can still tell a retryable
//! `UNAVAILABLE` from a definite `FAILED_PRECONDITION`. For anything this does not
//! cover (compression, per-call metadata), use the generated
//! [`OrderServiceClient`] directly.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ordersaga_proto::client::OrderClient;
//!
//! let client = OrderClient::connect("http://127.0.0.1:50051", "dev-key").await?;
//! let order = client.get_order("0b6f1d3c-2f7a-4a55-9a77-54e1c6f9f001").await?;
//! println!("{:?}", order.status());
//! # Ok(())
//! # }
//! ```

use std::{fmt, time::Duration};

use tonic::{
    Request, Status, Streaming,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::orders::v1::{
    CancelOrderRequest, CreateOrderRequest, GetOrderRequest, ListOrdersRequest, ListOrdersResponse,
    Order, ResolveCompensationRequest, RetryCompensationRequest, WatchOrderRequest,
    WatchOrderResponse, order_service_client::OrderServiceClient,
};

/// The metadata key the services read the API key from.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Interceptor adding the API key to every outgoing call.
///
/// The key is parsed once, up front. A key that can't be sent as metadata (not
/// visible ASCII) fails each call with `UNAUTHENTICATED` instead of failing
/// construction, so [`OrderClient::from_channel`] stays infallible and the error
/// still surfaces as a [`Status`], like every other call error.
#[derive(Clone)]
pub struct ApiKey(Option<AsciiMetadataValue>);

impl ApiKey {
    /// Parses `key` once, so no call pays for it again.
    pub fn new(key: &str) -> Self {
        Self(AsciiMetadataValue::try_from(key).ok().map(|mut value| {
            // Keeps the key out of HPACK's dynamic table and out of debug output.
            value.set_sensitive(true);
            value
        }))
    }
}

impl fmt::Debug for ApiKey {
    // Never print the key itself: clients end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(key) = &self.0 else {
            return Err(Status::unauthenticated(
                "the API key is not a valid metadata value (visible ASCII only)",
            ));
        };
        request.metadata_mut().insert(API_KEY_HEADER, key.clone());
        Ok(request)
    }
}

/// A client of the orchestrator's `OrderService` that sends the API key with
/// every call and unwraps the `order` out of each reply.
///
/// Cloning is cheap and clones share one connection. Methods take `&self` (each
/// call works on its own clone of the channel handle), so one client can serve
/// many tasks at once without locking.
#[derive(Clone, Debug)]
pub struct OrderClient {
    inner: OrderServiceClient<InterceptedService<Channel, ApiKey>>,
}

impl OrderClient {
    /// Connects to `endpoint`, e.g. `"http://127.0.0.1:50051"`.
    ///
    /// Connects eagerly, so an unreachable server is reported here rather than at
    /// the first call. For TLS, timeouts or a lazy connection, build the
    /// [`Channel`] yourself and use [`OrderClient::from_channel`].
    pub async fn connect(
        endpoint: impl Into<String>,
        api_key: &str,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(endpoint.into())?.connect().await?;
        Ok(Self::from_channel(channel, api_key))
    }

    /// Wraps an existing channel, e.g. one shared with other clients.
    pub fn from_channel(channel: Channel, api_key: &str) -> Self {
        Self {
            inner: OrderServiceClient::with_interceptor(channel, ApiKey::new(api_key)),
        }
    }

    /// Records the order and starts its saga; replies at once with the order as
    /// recorded (usually `PENDING` or `RUNNING`).
    ///
    /// Idempotent on `request_id`: after an ambiguous failure (`UNAVAILABLE`,
    /// `DEADLINE_EXCEEDED`), retry with the same request to get the same order.
    pub async fn create_order(&self, request: CreateOrderRequest) -> Result<Order, Status> {
        let reply = self.inner.clone().create_order(request).await?;
        order_of(reply.into_inner().order)
    }

    /// Like [`create_order`](Self::create_order), but asks the server to reply
    /// only when the saga is terminal, or just before `timeout`.
    ///
    /// `timeout` travels as the call's `grpc-timeout`, which the server uses as its
    /// deadline, so the order returned may still be in progress: check its status.
    /// The deadline is the server's to keep; this client does not enforce it locally.
    pub async fn create_order_and_wait(
        &self,
        mut request: CreateOrderRequest,
        timeout: Duration,
    ) -> Result<Order, Status> {
        request.wait = true;
        let mut request = Request::new(request);
        request.set_timeout(timeout);
        let reply = self.inner.clone().create_order(request).await?;
        order_of(reply.into_inner().order)
    }

    /// Fetches one order; `NOT_FOUND` if there is none with this ID.
    pub async fn get_order(&self, order_id: impl Into<String>) -> Result<Order, Status> {
        let request = GetOrderRequest {
            order_id: order_id.into(),
        };
        let reply = self.inner.clone().get_order(request).await?;
        order_of(reply.into_inner().order)
    }

    /// Lists one page of orders, newest first.
    ///
    /// The whole response is returned, not just the orders, because its
    /// `next_page_token` is what fetches the next page.
    pub async fn list_orders(
        &self,
        request: ListOrdersRequest,
    ) -> Result<ListOrdersResponse, Status> {
        Ok(self.inner.clone().list_orders(request).await?.into_inner())
    }

    /// Streams the order on each state change; the stream ends once the order is
    /// terminal.
    ///
    /// The raw stream is returned so callers pick how to consume it (`message()`
    /// in a loop, or as a `futures::Stream`); each item holds an optional order.
    pub async fn watch_order(
        &self,
        order_id: impl Into<String>,
    ) -> Result<Streaming<WatchOrderResponse>, Status> {
        let request = WatchOrderRequest {
            order_id: order_id.into(),
        };
        Ok(self.inner.clone().watch_order(request).await?.into_inner())
    }

    /// Cancels the order before payment: its done steps are compensated and it
    /// ends `CANCELLED`. After the charge, `FAILED_PRECONDITION`.
    ///
    /// Idempotent on `request_id`, like [`create_order`](Self::create_order).
    pub async fn cancel_order(
        &self,
        order_id: impl Into<String>,
        request_id: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Order, Status> {
        let request = CancelOrderRequest {
            request_id: request_id.into(),
            order_id: order_id.into(),
            reason: reason.into(),
        };
        let reply = self.inner.clone().cancel_order(request).await?;
        order_of(reply.into_inner().order)
    }

    /// Runs the failed compensation of a NEEDS_ATTENTION order again. An
    /// operator action: the client must carry the admin key.
    pub async fn retry_compensation(
        &self,
        order_id: impl Into<String>,
        request_id: impl Into<String>,
    ) -> Result<Order, Status> {
        let request = RetryCompensationRequest {
            request_id: request_id.into(),
            order_id: order_id.into(),
        };
        let reply = self.inner.clone().retry_compensation(request).await?;
        order_of(reply.into_inner().order)
    }

    /// Records that `operator` undid the failed compensation of a
    /// NEEDS_ATTENTION order by hand (`reason`: what they did); the saga goes
    /// on to COMPENSATED. An operator action: the client must carry the
    /// admin key.
    pub async fn resolve_compensation(
        &self,
        order_id: impl Into<String>,
        request_id: impl Into<String>,
        operator: impl Into<String>,
        reason: impl Into<String>,
    ) -> Result<Order, Status> {
        let request = ResolveCompensationRequest {
            request_id: request_id.into(),
            order_id: order_id.into(),
            operator: operator.into(),
            reason: reason.into(),
        };
        let reply = self.inner.clone().resolve_compensation(request).await?;
        order_of(reply.into_inner().order)
    }
}

/// Every reply carries an order by contract; a reply without one is a server bug,
/// reported as `INTERNAL` rather than hidden behind a default order.
fn order_of(order: Option<Order>) -> Result<Order, Status> {
    order.ok_or_else(|| Status::internal("reply without order"))
}
