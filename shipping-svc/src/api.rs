//! The gRPC handlers of `shipping.v1.ShippingService`.
//!
//! Each handler validates its request (INVALID_ARGUMENT names the field and
//! nothing is written), then runs its mutation once per `request_id`.

use std::collections::BTreeSet;

use ordersaga_proto::shipping::v1::{
    CancelShipmentRequest, CancelShipmentResponse, GetShipmentRequest, GetShipmentResponse,
    PrepareShipmentBatchRequest, PrepareShipmentBatchResponse, PrepareShipmentRequest,
    PrepareShipmentResponse, ServiceLevel, shipping_service_server::ShippingService,
};
use svc_kit::{
    Error, batch,
    combined::{Combiner, Offered},
    idempotency::{ClaimRow, Refusal, RequestKey, run_once_batched_claiming},
    store::Store,
    validate,
};
use tonic::{Request, Response, Status};

use crate::{
    combined::{Prepare, PrepareMany},
    error::ShippingError,
    shipments::{self, NewShipment},
};

/// Most items one shipment may carry.
const MAX_ITEMS: i64 = 1_000_000;

pub struct ShippingApi {
    store: Store,
    countries: BTreeSet<String>,
    /// On PostgreSQL: the prepares that come together, in one statement.
    prepares: Option<Combiner<PrepareMany>>,
}

impl ShippingApi {
    pub fn new(store: Store, countries: BTreeSet<String>) -> Self {
        let prepares = store
            .shared
            .clone()
            .map(|shared| Combiner::new(shared, PrepareMany));
        ShippingApi {
            store,
            countries,
            prepares,
        }
    }
}

impl ShippingApi {
    /// One PrepareShipment, alone or as an item of a batch.
    #[tracing::instrument(name = "prepare_shipment", skip_all, fields(order_id = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn prepare(
        &self,
        req: PrepareShipmentRequest,
    ) -> Result<PrepareShipmentResponse, Status> {
        let new = validate_prepare(&req)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[
            ("order_id", &req.order_id),
            ("request_id", &req.request_id),
        ]);
        let key = RequestKey::new("PrepareShipment", &req.request_id, &req);
        // Refused inside the request's transaction, so that the refusal is
        // stored with the request_id.
        let not_served = (!self.countries.contains(&new.address.country)).then(|| {
            Status::from(ShippingError::CountryNotServed {
                country: new.address.country.clone(),
            })
        });
        let combiner = self.prepares.as_ref().filter(|c| c.takes_offers_now());
        if let (Some(combiner), None) = (combiner, &not_served) {
            let shipment = shipments::to_prepare(new.clone());
            let reply = PrepareShipmentResponse {
                shipment: Some(shipment),
            };
            let shipment = reply.shipment.as_ref().expect("just set");
            let claim = ClaimRow::new(&key, shipment.created_at_ms, &reply);
            let item = Prepare::new(shipment, new.item_count, claim);
            match combiner.offer(item).await {
                Offered::Written(()) => return Ok(reply),
                Offered::Failed(status) => return Err(status),
                Offered::NotWritten => {}
            }
        }
        let sqlite_new = new.clone();
        let sqlite_not_served = not_served.clone();
        let reply = run_once_batched_claiming(
            &self.store,
            key,
            // A country not served writes nothing, and neither does a
            // prepare refused: its one statement wrote nothing. On
            // PostgreSQL it is one statement, its claim included
            // ([`shipments::prepare`]).
            Refusal::OneStatement,
            async |conn, claim| {
                if let Some(refusal) = &not_served {
                    return Err(refusal.clone());
                }
                let (shipment, claimed) = shipments::prepare(conn, new.clone(), claim).await?;
                Ok((
                    PrepareShipmentResponse {
                        shipment: Some(shipment),
                    },
                    claimed,
                ))
            },
            move |conn| {
                if let Some(refusal) = sqlite_not_served {
                    return Err(refusal);
                }
                Ok(PrepareShipmentResponse {
                    shipment: Some(shipments::prepare_sqlite(conn, sqlite_new)?),
                })
            },
        )
        .await?;
        Ok(reply)
    }
}

#[tonic::async_trait]
impl ShippingService for ShippingApi {
    async fn prepare_shipment(
        &self,
        request: Request<PrepareShipmentRequest>,
    ) -> Result<Response<PrepareShipmentResponse>, Status> {
        self.prepare(request.into_inner()).await.map(Response::new)
    }

    async fn prepare_shipment_batch(
        &self,
        request: Request<PrepareShipmentBatchRequest>,
    ) -> Result<Response<PrepareShipmentBatchResponse>, Status> {
        let (_, extensions, batch) = request.into_parts();
        let results = batch::run(
            &extensions,
            "shipping.v1.ShippingService/PrepareShipment",
            batch.items,
            |req| self.prepare(req),
        )
        .await?;
        Ok(Response::new(PrepareShipmentBatchResponse { results }))
    }

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn cancel_shipment(
        &self,
        request: Request<CancelShipmentRequest>,
    ) -> Result<Response<CancelShipmentResponse>, Status> {
        let req = request.into_inner();
        validate::id("request_id", &req.request_id)?;
        validate::uuid("order_id", &req.order_id)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[
            ("order_id", &req.order_id),
            ("request_id", &req.request_id),
        ]);
        let key = RequestKey::new("CancelShipment", &req.request_id, &req);
        let order_id = req.order_id.clone();
        // On PostgreSQL's shared transaction a cancel is one statement with
        // its claim, or writes nothing (see `svc_kit::undo`).
        let reply = run_once_batched_claiming(
            &self.store,
            key,
            Refusal::OneStatement,
            async |conn, claim| Ok(shipments::cancel_claiming(conn, &req.order_id, claim).await?),
            move |conn| Ok(shipments::cancel_sqlite(conn, &order_id)?),
        )
        .await?;
        Ok(Response::new(reply))
    }

    async fn get_shipment(
        &self,
        request: Request<GetShipmentRequest>,
    ) -> Result<Response<GetShipmentResponse>, Status> {
        let req = request.into_inner();
        validate::uuid("order_id", &req.order_id)?;
        let mut conn = self.store.pool.acquire().await.map_err(Error::from)?;
        let shipment = shipments::get(&mut conn, &req.order_id).await?;
        Ok(Response::new(GetShipmentResponse {
            shipment: Some(shipment),
        }))
    }
}

pub fn validate_prepare(req: &PrepareShipmentRequest) -> Result<NewShipment, Error> {
    validate::id("request_id", &req.request_id)?;
    validate::uuid("order_id", &req.order_id)?;
    let address = validate::present("address", req.address.as_ref())?;
    validate::text("address.recipient", &address.recipient, 200)?;
    validate::text("address.line1", &address.line1, 200)?;
    validate::text("address.city", &address.city, 100)?;
    validate::text("address.postal_code", &address.postal_code, 20)?;
    validate::country("address.country", &address.country)?;
    let service_level =
        match validate::known_enum::<ServiceLevel>("service_level", req.service_level, true)? {
            ServiceLevel::Unspecified => ServiceLevel::Standard,
            level => level,
        };
    validate::quantity("item_count", req.item_count, MAX_ITEMS)?;
    Ok(NewShipment {
        order_id: req.order_id.clone(),
        address: address.clone(),
        service_level,
        item_count: req.item_count,
    })
}
