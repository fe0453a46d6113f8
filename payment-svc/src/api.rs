//! The gRPC handlers of `payment.v1.PaymentService`.
//!
//! Each handler validates its request (INVALID_ARGUMENT names the field and
//! nothing is written), then runs its mutation once per `request_id`.

use ordersaga_proto::payment::v1::{
    ChargeBatchRequest, ChargeBatchResponse, ChargeRequest, ChargeResponse, DepositRequest,
    DepositResponse, GetAccountRequest, GetAccountResponse, GetPaymentRequest, GetPaymentResponse,
    RefundRequest, RefundResponse, payment_service_server::PaymentService,
};
use svc_kit::{
    Error, batch,
    combined::{Combiner, Offered},
    idempotency::{
        ClaimRow, Refusal, RequestKey, run_once, run_once_batched, run_once_batched_claiming,
    },
    store::Store,
    validate,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    accounts,
    charges::{self, NewCharge},
    combined::{Charge, ChargeMany},
};

pub struct PaymentApi {
    store: Store,
    /// On PostgreSQL: the charges that come together, in one statement.
    charges: Option<Combiner<ChargeMany>>,
}

impl PaymentApi {
    pub fn new(store: Store) -> Self {
        let charges = store
            .shared
            .clone()
            .map(|shared| Combiner::new(shared, ChargeMany));
        PaymentApi { store, charges }
    }
}

impl PaymentApi {
    /// One Charge, alone or as an item of a batch.
    #[tracing::instrument(name = "charge", skip_all, fields(order_id = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn charge_one(&self, req: ChargeRequest) -> Result<ChargeResponse, Status> {
        let new = validate_charge(&req)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[
            ("order_id", &req.order_id),
            ("request_id", &req.request_id),
        ]);
        let key = RequestKey::new("Charge", &req.request_id, &req);
        if let Some(combiner) = self.charges.as_ref().filter(|c| c.takes_offers_now()) {
            // The reply but its balance, which the statement tells.
            let mut reply = ChargeResponse {
                payment_id: Uuid::new_v4().to_string(),
                amount_cents: new.amount_cents,
                currency: new.currency.clone(),
                balance_cents: 0,
            };
            let claim = ClaimRow::new(&key, svc_kit::time::now_ms(), &reply);
            let item = Charge::new(&new.order_id, &new.customer_id, &reply, claim);
            match combiner.offer(item).await {
                Offered::Written(balance_cents) => {
                    reply.balance_cents = balance_cents;
                    return Ok(reply);
                }
                Offered::Failed(status) => return Err(status),
                Offered::NotWritten => {}
            }
        }
        let sqlite_new = new.clone();
        let reply = run_once_batched_claiming(
            &self.store,
            key,
            // On PostgreSQL a charge is one statement that writes all or
            // nothing, its claim included ([`charges::charge`]).
            Refusal::OneStatement,
            async |conn, claim| Ok(charges::charge(conn, new.clone(), claim).await?),
            move |conn| Ok(charges::charge_sqlite(conn, sqlite_new)?),
        )
        .await?;
        Ok(reply)
    }
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn charge(
        &self,
        request: Request<ChargeRequest>,
    ) -> Result<Response<ChargeResponse>, Status> {
        self.charge_one(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn charge_batch(
        &self,
        request: Request<ChargeBatchRequest>,
    ) -> Result<Response<ChargeBatchResponse>, Status> {
        let (_, extensions, batch) = request.into_parts();
        let results = batch::run(
            &extensions,
            "payment.v1.PaymentService/Charge",
            batch.items,
            |req| self.charge_one(req),
        )
        .await?;
        Ok(Response::new(ChargeBatchResponse { results }))
    }

    #[tracing::instrument(skip_all, fields(order_id = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn refund(
        &self,
        request: Request<RefundRequest>,
    ) -> Result<Response<RefundResponse>, Status> {
        let req = request.into_inner();
        validate::id("request_id", &req.request_id)?;
        validate::uuid("order_id", &req.order_id)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[
            ("order_id", &req.order_id),
            ("request_id", &req.request_id),
        ]);
        let key = RequestKey::new("Refund", &req.request_id, &req);
        let order_id = req.order_id.clone();
        let reply = run_once_batched(
            &self.store,
            key,
            Refusal::MayWrite,
            async |conn| Ok(charges::refund(conn, &req.order_id).await?),
            move |conn| Ok(charges::refund_sqlite(conn, &order_id)?),
        )
        .await?;
        Ok(Response::new(reply))
    }

    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<GetAccountResponse>, Status> {
        let req = request.into_inner();
        validate::id("customer_id", &req.customer_id)?;
        let mut conn = self.store.pool.acquire().await.map_err(Error::from)?;
        let account = accounts::get(&mut conn, &req.customer_id).await?;
        Ok(Response::new(GetAccountResponse {
            account: Some(account),
        }))
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<GetPaymentResponse>, Status> {
        let req = request.into_inner();
        validate::uuid("order_id", &req.order_id)?;
        let mut conn = self.store.pool.acquire().await.map_err(Error::from)?;
        let payment = charges::get(&mut conn, &req.order_id)
            .await
            .map_err(Error::from)?
            .ok_or_else(|| {
                svc_kit::error::refusal(
                    tonic::Code::NotFound,
                    crate::error::DOMAIN,
                    "NO_PAYMENT",
                    format!("no payment for order {}", req.order_id),
                )
            })?;
        Ok(Response::new(GetPaymentResponse {
            payment: Some(payment),
        }))
    }

    #[tracing::instrument(skip_all, fields(customer_id = tracing::field::Empty, request_id = tracing::field::Empty))]
    async fn deposit(
        &self,
        request: Request<DepositRequest>,
    ) -> Result<Response<DepositResponse>, Status> {
        let req = request.into_inner();
        validate::id("request_id", &req.request_id)?;
        validate::id("customer_id", &req.customer_id)?;
        validate::amount_cents("amount_cents", req.amount_cents)?;
        validate::currency("currency", &req.currency)?;
        // Only now, valid, do the fields go into the span.
        svc_kit::propagation::record_fields(&[
            ("customer_id", &req.customer_id),
            ("request_id", &req.request_id),
        ]);
        let key = RequestKey::new("Deposit", &req.request_id, &req);
        let reply = run_once(&self.store, key, async |conn| {
            Ok(DepositResponse {
                account: Some(
                    accounts::deposit(conn, &req.customer_id, req.amount_cents, &req.currency)
                        .await?,
                ),
            })
        })
        .await?;
        Ok(Response::new(reply))
    }
}

pub fn validate_charge(req: &ChargeRequest) -> Result<NewCharge, Error> {
    validate::id("request_id", &req.request_id)?;
    validate::uuid("order_id", &req.order_id)?;
    validate::id("customer_id", &req.customer_id)?;
    validate::amount_cents("amount_cents", req.amount_cents)?;
    validate::currency("currency", &req.currency)?;
    Ok(NewCharge {
        order_id: req.order_id.clone(),
        customer_id: req.customer_id.clone(),
        amount_cents: req.amount_cents,
        currency: req.currency.clone(),
    })
}
