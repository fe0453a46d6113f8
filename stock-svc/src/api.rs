//! The gRPC handlers of `stock.v1.StockService`.
//!
//! Each handler validates its request (INVALID_ARGUMENT names the field and
//! nothing is written), then runs its mutation once per `request_id`.

use std::collections::HashSet;

use ordersaga_proto::stock::v1::{
    GetProductRequest, GetProductResponse, GetReservationRequest, GetReservationResponse,
    ListProductsRequest, ListProductsResponse, OrderLine, ReleaseStockRequest,
    ReleaseStockResponse, ReserveStockBatchRequest, ReserveStockBatchResponse, ReserveStockRequest,
    ReserveStockResponse, RestockRequest, RestockResponse, stock_service_server::StockService,
};
use svc_kit::{
    Error, batch,
    combined::{Combiner, Offered},
    idempotency::{ClaimRow, Refusal, RequestKey, run_once, run_once_batched_claiming},
    store::Store,
    validate,
};
use tonic::{Request, Response, Status};

use crate::{
    catalogue::{self, NewProduct, Restock},
    combined::{Reserve, ReserveMany},
    reservations::{self, Line},
};

/// Most units one restock may add.
const MAX_RESTOCK: i64 = 1_000_000;

pub struct StockApi {
    store: Store,
    /// On PostgreSQL: the reservations that come together, in one statement.
    reservations: Option<Combiner<ReserveMany>>,
}

impl StockApi {
    pub fn new(store: Store) -> Self {
        let reservations = store
            .shared
            .clone()
            .map(|shared| Combiner::new(shared, ReserveMany));
        StockApi {
            store,
            reservations,
        }
    }
}

impl StockApi {
    /// One ReserveStock, alone or as an item of a batch.
    #[tracing::instrument(name = "reserve_stock", skip_all, fields(order_id = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn reserve(&self, req: ReserveStockRequest) -> Result<ReserveStockResponse, Status> {
        let lines = validate_reserve(&req)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[
            ("order_id", &req.order_id),
            ("request_id", &req.request_id),
        ]);
        // The expected prices are a precondition, not part of what is asked:
        // a retry that adds them (an orchestrator upgraded between two
        // attempts) is the same request and gets the stored reply.
        let identity = ReserveStockRequest {
            lines: req
                .lines
                .iter()
                .map(|line| OrderLine {
                    expected_unit_price_cents: 0,
                    expected_currency: String::new(),
                    ..line.clone()
                })
                .collect(),
            ..req.clone()
        };
        let key = RequestKey::new("ReserveStock", &req.request_id, &identity);
        let combiner = self.reservations.as_ref().filter(|c| c.takes_offers_now());
        if let (Some(combiner), [line]) = (combiner, lines.as_slice())
            && let Some((unit_price_cents, currency)) = line.expected_price.clone()
        {
            let reply = reservations::priced_reply(line, unit_price_cents, currency);
            let claim = ClaimRow::new(&key, svc_kit::time::now_ms(), &reply);
            if let Some(item) = Reserve::new(&req.order_id, &reply, claim) {
                match combiner.offer(item).await {
                    Offered::Written(()) => return Ok(reply),
                    Offered::Failed(status) => return Err(status),
                    Offered::NotWritten => {}
                }
            }
        }
        let (order_id, sqlite_lines) = (req.order_id.clone(), lines.clone());
        let reply = run_once_batched_claiming(
            &self.store,
            key,
            reservations::refusal(&lines),
            async |conn, claim| {
                let lines = lines.clone();
                Ok(reservations::reserve_claiming(conn, &req.order_id, lines, claim).await?)
            },
            move |conn| Ok(reservations::reserve_sqlite(conn, &order_id, sqlite_lines)?),
        )
        .await?;
        Ok(reply)
    }
}

#[tonic::async_trait]
impl StockService for StockApi {
    async fn reserve_stock(
        &self,
        request: Request<ReserveStockRequest>,
    ) -> Result<Response<ReserveStockResponse>, Status> {
        self.reserve(request.into_inner()).await.map(Response::new)
    }

    async fn reserve_stock_batch(
        &self,
        request: Request<ReserveStockBatchRequest>,
    ) -> Result<Response<ReserveStockBatchResponse>, Status> {
        let (_, extensions, batch) = request.into_parts();
        let results = batch::run(
            &extensions,
            "stock.v1.StockService/ReserveStock",
            batch.items,
            |req| self.reserve(req),
        )
        .await?;
        Ok(Response::new(ReserveStockBatchResponse { results }))
    }

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn release_stock(
        &self,
        request: Request<ReleaseStockRequest>,
    ) -> Result<Response<ReleaseStockResponse>, Status> {
        let req = request.into_inner();
        validate::id("request_id", &req.request_id)?;
        validate::uuid("order_id", &req.order_id)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[
            ("order_id", &req.order_id),
            ("request_id", &req.request_id),
        ]);
        let key = RequestKey::new("ReleaseStock", &req.request_id, &req);
        let order_id = req.order_id.clone();
        // On PostgreSQL's shared transaction a release is one statement
        // with its claim, or writes nothing (see `reservations::RELEASE_CLAIMING`).
        let reply = run_once_batched_claiming(
            &self.store,
            key,
            Refusal::OneStatement,
            async |conn, claim| {
                Ok(reservations::release_claiming(conn, &req.order_id, claim).await?)
            },
            move |conn| Ok(reservations::release_sqlite(conn, &order_id)?),
        )
        .await?;
        Ok(Response::new(reply))
    }

    async fn get_product(
        &self,
        request: Request<GetProductRequest>,
    ) -> Result<Response<GetProductResponse>, Status> {
        let req = request.into_inner();
        validate::sku("sku", &req.sku)?;
        let mut conn = self.store.pool.acquire().await.map_err(Error::from)?;
        let product = catalogue::get(&mut conn, &req.sku).await?;
        Ok(Response::new(GetProductResponse {
            product: Some(product),
        }))
    }

    async fn get_reservation(
        &self,
        request: Request<GetReservationRequest>,
    ) -> Result<Response<GetReservationResponse>, Status> {
        let req = request.into_inner();
        validate::uuid("order_id", &req.order_id)?;
        let mut conn = self.store.pool.acquire().await.map_err(Error::from)?;
        let reservation = reservations::get(&mut conn, &req.order_id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| {
                svc_kit::error::refusal(
                    tonic::Code::NotFound,
                    crate::error::DOMAIN,
                    "NO_RESERVATION",
                    format!("no reservation for order {}", req.order_id),
                )
            })?;
        Ok(Response::new(GetReservationResponse {
            reservation: Some(reservation),
        }))
    }

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        let req = request.into_inner();
        let limit = validate::page_size("page_size", req.page_size, 100, 500)?;
        if !req.page_token.is_empty() {
            validate::sku("page_token", &req.page_token)?;
        }
        let (products, next) = catalogue::list(&self.store.pool, &req.page_token, limit).await?;
        Ok(Response::new(ListProductsResponse {
            products,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(sku = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn restock(
        &self,
        request: Request<RestockRequest>,
    ) -> Result<Response<RestockResponse>, Status> {
        let req = request.into_inner();
        let restock = validate_restock(&req)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[("sku", &req.sku), ("request_id", &req.request_id)]);
        let key = RequestKey::new("Restock", &req.request_id, &req);
        let product = run_once(&self.store, key, async |conn| {
            Ok(RestockResponse {
                product: Some(catalogue::restock(conn, restock).await?),
            })
        })
        .await?;
        Ok(Response::new(product))
    }
}

pub fn validate_reserve(req: &ReserveStockRequest) -> Result<Vec<Line>, Error> {
    validate::id("request_id", &req.request_id)?;
    validate::uuid("order_id", &req.order_id)?;
    validate::count("lines", req.lines.len(), validate::MAX_LINES)?;
    let mut seen = HashSet::with_capacity(req.lines.len());
    let mut lines = Vec::with_capacity(req.lines.len());
    for (i, line) in req.lines.iter().enumerate() {
        validate::sku(format!("lines[{i}].sku"), &line.sku)?;
        validate::quantity(
            format!("lines[{i}].quantity"),
            line.quantity,
            validate::MAX_LINE_QUANTITY,
        )?;
        if !seen.insert(line.sku.as_str()) {
            return Err(Error::invalid(
                format!("lines[{i}].sku"),
                format!("{:?} appears more than once; merge the lines", line.sku),
            ));
        }
        let expected_price = if line.expected_unit_price_cents != 0 {
            validate::amount_cents(
                format!("lines[{i}].expected_unit_price_cents"),
                line.expected_unit_price_cents,
            )?;
            validate::currency(
                format!("lines[{i}].expected_currency"),
                &line.expected_currency,
            )?;
            Some((
                line.expected_unit_price_cents,
                line.expected_currency.clone(),
            ))
        } else if !line.expected_currency.is_empty() {
            return Err(Error::invalid(
                format!("lines[{i}].expected_currency"),
                "is set without expected_unit_price_cents; set both or neither",
            ));
        } else {
            None
        };
        lines.push(Line {
            sku: line.sku.clone(),
            quantity: line.quantity,
            expected_price,
        });
    }
    Ok(lines)
}

pub fn validate_restock(req: &RestockRequest) -> Result<Restock, Error> {
    validate::id("request_id", &req.request_id)?;
    validate::sku("sku", &req.sku)?;
    validate::quantity("quantity", req.quantity, MAX_RESTOCK)?;
    let describes_product =
        !req.name.is_empty() || req.unit_price_cents != 0 || !req.currency.is_empty();
    let new_product = if describes_product {
        validate::text("name", &req.name, 200)?;
        validate::amount_cents("unit_price_cents", req.unit_price_cents)?;
        validate::currency("currency", &req.currency)?;
        Some(NewProduct {
            name: req.name.clone(),
            unit_price_cents: req.unit_price_cents,
            currency: req.currency.clone(),
        })
    } else {
        None
    };
    Ok(Restock {
        sku: req.sku.clone(),
        quantity: req.quantity,
        new_product,
    })
}
