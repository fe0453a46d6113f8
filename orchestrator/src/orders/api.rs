//! The gRPC handlers of `orders.v1.OrderService`.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use ordersaga_proto::orders::v1::{
    CancelOrderRequest, CancelOrderResponse, CreateOrderRequest, CreateOrderResponse,
    GetOrderRequest, GetOrderResponse, ListOrdersRequest, ListOrdersResponse, Order,
    ResolveCompensationRequest, ResolveCompensationResponse, RetryCompensationRequest,
    RetryCompensationResponse, WatchOrderRequest, WatchOrderResponse,
    order_service_server::OrderService,
};
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use saga_engine::{CancelOutcome, Engine, Reopen, ReopenOutcome, SagaStatus, SagaWatch, Started};

use crate::{
    error::OrderError,
    order_saga::OrderData,
    orders::{
        pricing::{self, Catalogue},
        store::{self, ListFilter, PageToken},
        validate,
        watch_limits::WatchLimits,
        watch_views::WatchViews,
    },
};

pub struct OrderApi {
    engine: Engine<OrderData>,
    catalogue: Arc<Catalogue>,
    /// How long a `wait` may last when the client sent no deadline.
    max_wait: Duration,
    watch_limits: WatchLimits,
    /// Past this many sagas waiting for a slot, new orders are refused.
    max_waiting_sagas: usize,
    /// The views WatchOrder streams share, one per watched order.
    watch_views: WatchViews,
}

impl OrderApi {
    pub fn new(
        engine: Engine<OrderData>,
        catalogue: Arc<Catalogue>,
        max_wait: Duration,
        watch_limits: WatchLimits,
        max_waiting_sagas: usize,
        registry: &mut Registry,
    ) -> Self {
        OrderApi {
            watch_views: WatchViews::new(engine.clone(), registry),
            engine,
            catalogue,
            max_wait,
            watch_limits,
            max_waiting_sagas,
        }
    }

    /// The order, once its saga is terminal or when `deadline` comes, whichever is first.
    async fn wait_for_terminal(
        &self,
        order_id: Uuid,
        deadline: tokio::time::Instant,
        mut changes: SagaWatch,
        just_started: bool,
    ) -> Result<Order, OrderError> {
        // A saga started by this very call is known to be running: skip the
        // first read. `changes` was made before it started, so no change
        // slips through.
        if just_started && !wait_for_change(deadline, &mut changes).await {
            return Ok(store::load_one(&self.engine, order_id).await?.0);
        }
        loop {
            // Told its end with the saga as it ended (its driver recorded
            // it and kept it as the log holds it): nothing to read.
            if let Some(view) = changes.final_view() {
                return Ok(store::render(order_id, &view)?.0);
            }
            let (order, status) = store::load_one(&self.engine, order_id).await?;
            if status.is_terminal() || !wait_for_change(deadline, &mut changes).await {
                return Ok(order);
            }
        }
    }

    fn wait_deadline(&self, metadata: &MetadataMap) -> tokio::time::Instant {
        let budget = client_deadline(metadata)
            .unwrap_or(self.max_wait)
            .min(self.max_wait);
        // Reply just before the client's deadline, leaving time for the reply to travel.
        let margin = (budget / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
        tokio::time::Instant::now() + budget.saturating_sub(margin)
    }
}

/// Returns true when the saga may have become terminal, false at the
/// deadline. A change to a status that is not terminal needs no read.
async fn wait_for_change(deadline: tokio::time::Instant, changes: &mut SagaWatch) -> bool {
    loop {
        tokio::select! {
            status = changes.changed() => match status {
                Some(status) if !status.is_terminal() => continue,
                _ => return true,
            },
            () = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOrderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl OrderService for OrderApi {
    #[tracing::instrument(skip_all, fields(request_id = tracing::field::Empty))]
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        // First of all, before the request is validated, encoded again or
        // looked up: under overload, refusals must cost next to nothing, or
        // they crowd out the sagas already taken.
        self.refuse_if_backlogged()?;
        let deadline = self.wait_deadline(request.metadata());
        let req = request.into_inner();
        let new = validate::create(&req)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[("request_id", &req.request_id)]);
        // `wait` is how the client wants the reply, not part of the order.
        let fingerprint = CreateOrderRequest {
            wait: false,
            ..req.clone()
        }
        .encode_to_vec();

        let (order_id, changes, just_started) = self.record_or_find(new, fingerprint).await?;
        let order = if req.wait {
            self.wait_for_terminal(order_id, deadline, changes, just_started)
                .await?
        } else {
            store::load_one(&self.engine, order_id).await?.0
        };
        Ok(Response::new(CreateOrderResponse { order: Some(order) }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        let order_id = svc_kit::validate::uuid("order_id", &request.get_ref().order_id)?;
        let (order, _) = store::load_one(&self.engine, order_id).await?;
        Ok(Response::new(GetOrderResponse { order: Some(order) }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let req = request.into_inner();
        let customer_id = if req.customer_id.is_empty() {
            None
        } else {
            svc_kit::validate::id("customer_id", &req.customer_id)?;
            Some(req.customer_id.clone())
        };
        let statuses = validate::status_filter(&req.statuses)?;
        let limit = svc_kit::validate::page_size("page_size", req.page_size, 50, 500)?;
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(PageToken::decode(token).ok_or_else(|| {
                svc_kit::Error::invalid(
                    "page_token",
                    "is not a token from a previous ListOrders reply",
                )
            })?),
        };
        let (created_after_ms, created_before_ms) =
            validate::created_window(req.created_after.as_ref(), req.created_before.as_ref())?;
        // Every field checked first: a request wrong elsewhere is refused,
        // whatever its statuses.
        if !req.statuses.is_empty() && statuses.is_empty() {
            // Only PENDING was asked for, and no order waits in PENDING.
            return Ok(Response::new(ListOrdersResponse::default()));
        }
        let filter = ListFilter {
            customer_id,
            statuses,
            after,
            created_after_ms,
            created_before_ms,
            limit,
        };
        let (ids, next) = store::list(self.engine.pool(), &filter).await?;
        let mut conn = self
            .engine
            .pool()
            .acquire()
            .await
            .map_err(OrderError::from)?;
        let mut orders = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((order, _)) = store::load(&mut conn, id).await? {
                orders.push(order);
            }
        }
        Ok(Response::new(ListOrdersResponse {
            orders,
            next_page_token: next.map(|t| t.encode()).unwrap_or_default(),
        }))
    }

    type WatchOrderStream = WatchStream;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let order_id = svc_kit::validate::uuid("order_id", &request.get_ref().order_id)?;
        let slot = self.watch_limits.open(request.remote_addr())?;
        let ends_at = tokio::time::Instant::now() + self.watch_limits.lifetime;
        let mut view = self.watch_views.subscribe(order_id);
        let first = match view.wait_for(Option::is_some).await {
            Ok(state) => state.clone(),
            Err(_) => None,
        }
        .ok_or_else(|| Status::unavailable("the order's view ended; watch again"))??;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            // Held for the stream's life: its place among the open streams.
            let _slot = slot;
            let mut last = first.0.clone();
            if tx
                .send(Ok(WatchOrderResponse {
                    order: Some(first.0.clone()),
                }))
                .await
                .is_err()
                || first.1.is_terminal()
            {
                return;
            }
            loop {
                tokio::select! {
                    changed = view.changed() => if changed.is_err() {
                        // The view ended without a terminal snapshot we saw:
                        // only when the orchestrator stops.
                        let _ = tx.send(Err(Status::unavailable("the order's view ended; watch again"))).await;
                        return;
                    },
                    // The client left: stop watching now, not at the saga's
                    // next change (which may never come).
                    () = tx.closed() => return,
                    () = tokio::time::sleep_until(ends_at) => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "this watch reached its lifetime (WATCH_STREAM_MAX_SECS); watch again to go on",
                            )))
                            .await;
                        return;
                    }
                }
                let Some(next) = view.borrow_and_update().clone() else {
                    continue;
                };
                let next = match next {
                    Ok(next) => next,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if next.0 == last {
                    continue;
                }
                last = next.0.clone();
                if tx
                    .send(Ok(WatchOrderResponse {
                        order: Some(next.0.clone()),
                    }))
                    .await
                    .is_err()
                    || next.1.is_terminal()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty))]
    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        let req = request.into_inner();
        svc_kit::validate::id("request_id", &req.request_id)?;
        let order_id = svc_kit::validate::uuid("order_id", &req.order_id)?;
        svc_kit::validate::optional_text("reason", &req.reason, 500)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[("order_id", &req.order_id)]);
        let outcome = self
            .engine
            .cancel(order_id)
            .await
            .map_err(OrderError::from)?;
        let refuse = |reason: String| OrderError::NotCancellable {
            order_id: order_id.to_string(),
            reason,
        };
        match outcome {
            CancelOutcome::Accepted => {
                tracing::info!(reason = %req.reason, "cancellation accepted");
            }
            CancelOutcome::AlreadyRequested | CancelOutcome::NotRunning(SagaStatus::Cancelled) => {}
            CancelOutcome::PastPivot => {
                return Err(refuse("the payment has been charged".into()).into());
            }
            CancelOutcome::NotRunning(status) => {
                return Err(refuse(format!("it is {}", status.as_str())).into());
            }
            CancelOutcome::NotFound => {
                return Err(OrderError::NotFound(order_id.to_string()).into());
            }
        }
        let (order, _) = store::load_one(&self.engine, order_id).await?;
        Ok(Response::new(CancelOrderResponse { order: Some(order) }))
    }

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty))]
    async fn retry_compensation(
        &self,
        request: Request<RetryCompensationRequest>,
    ) -> Result<Response<RetryCompensationResponse>, Status> {
        let req = request.into_inner();
        svc_kit::validate::id("request_id", &req.request_id)?;
        let order_id = svc_kit::validate::uuid("order_id", &req.order_id)?;
        svc_kit::propagation::record_fields(&[("order_id", &req.order_id)]);
        let order = self.reopen(order_id, req.request_id, None).await?;
        Ok(Response::new(RetryCompensationResponse {
            order: Some(order),
        }))
    }

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty))]
    async fn resolve_compensation(
        &self,
        request: Request<ResolveCompensationRequest>,
    ) -> Result<Response<ResolveCompensationResponse>, Status> {
        let req = request.into_inner();
        svc_kit::validate::id("request_id", &req.request_id)?;
        let order_id = svc_kit::validate::uuid("order_id", &req.order_id)?;
        svc_kit::validate::text("operator", &req.operator, 200)?;
        svc_kit::validate::text("reason", &req.reason, 500)?;
        svc_kit::propagation::record_fields(&[("order_id", &req.order_id)]);
        let note = format!(
            "resolved by hand by {}: {}",
            req.operator.trim(),
            req.reason.trim()
        );
        let order = self.reopen(order_id, req.request_id, Some(note)).await?;
        Ok(Response::new(ResolveCompensationResponse {
            order: Some(order),
        }))
    }
}

impl OrderApi {
    /// An operator's action on a NEEDS_ATTENTION order (see [`Reopen`]).
    async fn reopen(
        &self,
        order_id: Uuid,
        request_id: String,
        resolved_by_hand: Option<String>,
    ) -> Result<Order, Status> {
        let action = if resolved_by_hand.is_some() {
            "resolved by hand"
        } else {
            "compensation retried"
        };
        let outcome = self
            .engine
            .reopen(Reopen {
                saga_id: order_id,
                request_id: request_id.clone(),
                resolved_by_hand,
            })
            .await
            .map_err(OrderError::from)?;
        match outcome {
            ReopenOutcome::Reopened => tracing::warn!(%order_id, "{action} by an operator"),
            ReopenOutcome::Replayed => {}
            ReopenOutcome::RequestIdReused => {
                return Err(OrderError::ActionRequestIdReused(request_id).into());
            }
            ReopenOutcome::NotResting(status) => {
                return Err(OrderError::NotResting {
                    order_id: order_id.to_string(),
                    status: status.as_str().into(),
                }
                .into());
            }
            ReopenOutcome::NotFound => {
                return Err(OrderError::NotFound(order_id.to_string()).into());
            }
        }
        Ok(store::load_one(&self.engine, order_id).await?.0)
    }
}

impl OrderApi {
    /// Past `MAX_WAITING_SAGAS`, RESOURCE_EXHAUSTED: checked before anything
    /// is priced, recorded or looked up, since under overload a refusal at
    /// once beats a saga queued for longer than its client waits. Not even a
    /// replay of a known `request_id` is looked up: the refusal means "this
    /// call did nothing", and the same request sent again later is answered
    /// with the order it made, if it made one.
    fn refuse_if_backlogged(&self) -> Result<(), Status> {
        let waiting = self.engine.waiting();
        match waiting >= self.max_waiting_sagas {
            true => Err(OrderError::Backlogged { waiting }.into()),
            false => Ok(()),
        }
    }

    /// Records a new order and starts its saga, or finds the order this
    /// `request_id` made before. A new order is recorded without a lookup
    /// first (the order's insert refuses a `request_id` seen before, in the
    /// same transaction): a round trip fewer per order. The lookup comes only
    /// when the insert was refused, or before refusing an order that cannot
    /// be priced, so a replay is answered whatever the catalogue now says.
    async fn record_or_find(
        &self,
        new: validate::NewOrder,
        fingerprint: Vec<u8>,
    ) -> Result<(Uuid, SagaWatch, bool), Status> {
        let (items, total_cents, currency) = match pricing::price(&self.catalogue, &new.items).await
        {
            Ok(priced) => priced,
            Err(refusal) => {
                return self
                    .found_or(&new.request_id, &fingerprint, refusal.into())
                    .await;
            }
        };
        let order = OrderData {
            // Time-ordered (v7): a new saga's rows, and the services' rows
            // keyed by it, go to the last pages of each index, so a batch of
            // commits shares pages instead of writing one random page per
            // index per saga.
            order_id: Uuid::now_v7(),
            request_id: new.request_id.clone(),
            customer_id: new.customer_id,
            items,
            address: new.address,
            total_cents,
            currency,
        };
        let order_id = order.order_id;
        // Made before the saga can start, so a waiter misses no change.
        let changes = self.engine.watch(order_id);
        let admit = store::AdmitOrder::new(&order, fingerprint.clone());
        // The saga's span is a child of this call's span, so a client's
        // traceparent roots the whole saga.
        match self
            .engine
            .start(order_id, order, admit)
            .await
            .map_err(OrderError::from)?
        {
            Started::Started => Ok((order_id, changes, true)),
            // Another request with this request_id got there first.
            Started::Refused => {
                let vanished =
                    svc_kit::Error::Internal("order vanished after a request_id conflict".into());
                self.found_or(&new.request_id, &fingerprint, vanished.into())
                    .await
            }
        }
    }

    /// The order a `request_id` made before, with a watch of it (made
    /// before its saga is read, so a waiter misses no change); `otherwise`
    /// when there is none.
    async fn found_or(
        &self,
        request_id: &str,
        fingerprint: &[u8],
        otherwise: Status,
    ) -> Result<(Uuid, SagaWatch, bool), Status> {
        let Some((order_id, stored)) = store::find_by_request_id(&self.engine, request_id).await?
        else {
            return Err(otherwise);
        };
        let changes = self.engine.watch(order_id);
        let order_id = self
            .seen_before(request_id, order_id, &stored, fingerprint)
            .await?;
        Ok((order_id, changes, false))
    }

    /// The order of a `request_id` seen before, if the request is the same
    /// one; a retry also makes sure the order's saga is being driven (its
    /// first request may have been dropped between its commit and its start).
    async fn seen_before(
        &self,
        request_id: &str,
        order_id: Uuid,
        stored: &[u8],
        fingerprint: &[u8],
    ) -> Result<Uuid, Status> {
        let order_id = same_request(request_id, order_id, stored, fingerprint)?;
        self.engine
            .ensure_driven(order_id)
            .await
            .map_err(OrderError::from)?;
        Ok(order_id)
    }
}

/// The order of a `request_id` seen before, if the request is the same one.
fn same_request(
    request_id: &str,
    order_id: Uuid,
    stored: &[u8],
    fingerprint: &[u8],
) -> Result<Uuid, Status> {
    if stored == fingerprint {
        Ok(order_id)
    } else {
        Err(svc_kit::Error::RequestIdReused {
            request_id: request_id.to_owned(),
            method: "CreateOrder".into(),
        }
        .into())
    }
}

/// The client's deadline, from the `grpc-timeout` header (e.g. `500m`, `5S`);
/// an invalid value is no deadline (the server's own bound applies).
fn client_deadline(metadata: &MetadataMap) -> Option<Duration> {
    svc_kit::grpc_timeout::parse(metadata.get(svc_kit::grpc_timeout::HEADER)?.to_str().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        client_deadline(&metadata)
    }

    #[test]
    fn the_deadline_is_read_from_grpc_timeout_bounded_by_the_spec() {
        assert_eq!(deadline("500m"), Some(Duration::from_millis(500)));
        // More than 8 digits overflowed here once; now it is no deadline.
        assert_eq!(deadline("99999999999999999H"), None);
    }
}
