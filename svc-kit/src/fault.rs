//! Opt-in fault injection, to prove the saga survives a hostile network.
//!
//! Three faults, each off by default:
//! - fail a share of calls with UNAVAILABLE *before* doing the work;
//! - do the work, then drop the reply (the caller sees UNAVAILABLE although the
//!   effect happened: the case idempotency exists for);
//! - add latency before each call.
//!
//! It is a tower layer on the whole server, so handlers know nothing of it.
//! Health and reflection (`/grpc.*`) are never faulted. A batch call
//! (`crate::batch`) takes the latency once, and the two rates per item: each
//! item is a call, and its neighbours fare as theirs would.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use clap::Args;
use rand::Rng;
use tonic::Status;
use tower::{Layer, Service};

use crate::settings::parse_rate;

#[derive(Debug, Clone, Default, Args)]
pub struct FaultSettings {
    /// Share of calls (0.0–1.0) failed with UNAVAILABLE before any work is done.
    #[arg(long, env = "FAULT_UNAVAILABLE_RATE", value_name = "FAULT_UNAVAILABLE_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_unavailable_rate: f64,

    /// Share of calls (0.0–1.0) whose work is done but whose reply is replaced by UNAVAILABLE.
    #[arg(long, env = "FAULT_DROP_REPLY_RATE", value_name = "FAULT_DROP_REPLY_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_drop_reply_rate: f64,

    /// Latency added before every call, in milliseconds.
    #[arg(long, env = "FAULT_LATENCY_MS", value_name = "FAULT_LATENCY_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub fault_latency_ms: u64,
}

impl FaultSettings {
    pub fn is_active(&self) -> bool {
        self.fault_unavailable_rate > 0.0
            || self.fault_drop_reply_rate > 0.0
            || self.fault_latency_ms > 0
    }
}

impl FaultSettings {
    /// Drawn once per call (or batch item): the failure it gets before any
    /// work, if any.
    fn fails_before(&self, what: &str) -> Option<Status> {
        rand::rng()
            .random_bool(self.fault_unavailable_rate)
            .then(|| {
                tracing::debug!(what, "fault injected: failing before work");
                Status::unavailable("injected fault: call failed before any work")
            })
    }

    /// Drawn once per call (or batch item) after its work: the failure that
    /// replaces its reply, if any.
    fn drops_reply(&self, what: &str) -> Option<Status> {
        rand::rng()
            .random_bool(self.fault_drop_reply_rate)
            .then(|| {
                tracing::debug!(what, "fault injected: work done, reply dropped");
                Status::unavailable("injected fault: work done but reply dropped")
            })
    }

    /// `work` (one batch item of `method`) under the two rates, as a call.
    pub(crate) async fn around_item<R>(
        &self,
        method: &str,
        work: impl Future<Output = Result<R, Status>>,
    ) -> Result<R, Status> {
        if let Some(failure) = self.fails_before(method) {
            return Err(failure);
        }
        let result = work.await;
        match self.drops_reply(method) {
            Some(failure) => Err(failure),
            None => result,
        }
    }
}

#[derive(Clone)]
pub struct FaultLayer {
    settings: Arc<FaultSettings>,
}

impl FaultLayer {
    pub fn new(settings: FaultSettings) -> Self {
        FaultLayer {
            settings: Arc::new(settings),
        }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultService {
            inner,
            settings: self.settings.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FaultService<S> {
    inner: S,
    settings: Arc<FaultSettings>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for FaultService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone is not ready; keep the ready one for this call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let settings = self.settings.clone();
        let exempt = request.uri().path().starts_with("/grpc.");
        let batch = crate::methods::is_batch(request.uri().path());
        if batch && settings.is_active() {
            request
                .extensions_mut()
                .get_or_insert_default::<crate::batch::ItemHooks>()
                .faults = Some(settings.clone());
        }
        Box::pin(async move {
            if exempt || !settings.is_active() {
                return inner.call(request).await;
            }
            if settings.fault_latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(settings.fault_latency_ms)).await;
            }
            if batch {
                // Its items take the rates one by one (`crate::batch`).
                return inner.call(request).await;
            }
            let path = request.uri().path().to_owned();
            if let Some(failure) = settings.fails_before(&path) {
                return Ok(failure.into_http());
            }
            let response = inner.call(request).await?;
            if let Some(failure) = settings.drops_reply(&path) {
                return Ok(failure.into_http());
            }
            Ok(response)
        })
    }
}
