//! Load shedding: past a number of calls in flight, a business call is
//! answered RESOURCE_EXHAUSTED at once instead of queueing.
//!
//! Queued calls under overload only grow latency for everyone and memory for
//! the server; a refusal that comes back in microseconds lets the client
//! back off or go to another replica. Health and reflection (`/grpc.*`) are
//! never shed: a probe must see a busy server as alive.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

#[derive(Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl ShedLayer {
    /// At most `limit` business calls in flight at once.
    pub fn new(limit: usize) -> Self {
        ShedLayer {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl ShedLayer {
    /// A slot for one call (or batch item), or the refusal that says the
    /// server is at its limit.
    pub(crate) fn try_take(&self) -> Result<OwnedSemaphorePermit, tonic::Status> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            crate::error::refusal(
                tonic::Code::ResourceExhausted,
                crate::error::DOMAIN,
                "OVERLOADED",
                format!(
                    "the server has {} calls in flight, its limit (MAX_CONCURRENT_CALLS); retry with backoff",
                    self.limit
                ),
            )
        })
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Shed<S>
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
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path().starts_with("/grpc.") {
            return Box::pin(inner.call(request));
        }
        if crate::methods::is_batch(request.uri().path()) {
            // The batch's slot is its first item's; its other items take
            // theirs as they start (see `crate::batch`).
            request
                .extensions_mut()
                .get_or_insert_default::<crate::batch::ItemHooks>()
                .shed = Some(self.layer.clone());
        }
        let permit = match self.layer.try_take() {
            Ok(permit) => permit,
            Err(refusal) => return Box::pin(async move { Ok(refusal.into_http()) }),
        };
        Box::pin(async move {
            // Held until the reply's headers: a unary call's whole life.
            let response = inner.call(request).await;
            drop(permit);
            response
        })
    }
}
