//! The cap on calls in flight to one service, aware of each call's deadline.
//!
//! Calls past the cap wait for a slot in the orchestrator. A call that spent
//! its deadline waiting must not be sent after all: its caller gives up at
//! once, and its HTTP/2 stream would be reset a moment after it was opened,
//! often before the service accepted it. h2's rapid-reset defence answers 20
//! such resets on a connection with GOAWAY, failing every call on the one
//! connection all sagas share; earlier, the services raised that limit to
//! 16,384 to survive us, which left them open to the attack. Instead, here:
//!
//! - a call is sent only with at least [`MIN_BUDGET`] of its deadline left,
//!   else it ends DEADLINE_EXCEEDED without touching the network;
//! - its `grpc-timeout` is rewritten to what is left, so the service's own
//!   deadline fires before the caller's (which has slack), and the service,
//!   not a reset, ends the call.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::HeaderValue;
use svc_kit::grpc_timeout;
use tokio::{sync::Semaphore, time::Instant};
use tonic::Status;
use tower::{Service, ServiceExt};

/// Less than this left of a deadline after the wait for a slot: not sent.
/// A round trip to a busy service takes longer; sending would only open a
/// stream to reset it.
pub const MIN_BUDGET: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct DeadlineCap<S> {
    inner: S,
    slots: Arc<Semaphore>,
}

impl<S> DeadlineCap<S> {
    /// At most `limit` calls in flight through `inner`.
    pub fn new(inner: S, limit: usize) -> Self {
        DeadlineCap {
            inner,
            slots: Arc::new(Semaphore::new(limit)),
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for DeadlineCap<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    /// Always ready: calls queue for a slot inside `call`, where their
    /// deadline is known.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let arrived = Instant::now();
        let budget = request
            .headers()
            .get(grpc_timeout::HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(grpc_timeout::parse);
        let (slots, mut inner) = (self.slots.clone(), self.inner.clone());
        Box::pin(async move {
            let slot = match budget {
                None => slots.acquire_owned().await,
                Some(budget) => {
                    let wait = budget.saturating_sub(MIN_BUDGET);
                    match tokio::time::timeout(wait, slots.acquire_owned()).await {
                        Ok(slot) => slot,
                        Err(_) => return Ok(spent(budget)),
                    }
                }
            }
            .expect("the semaphore is never closed");
            if let Some(budget) = budget {
                let left = budget.saturating_sub(arrived.elapsed());
                if left < MIN_BUDGET {
                    return Ok(spent(budget));
                }
                let value = HeaderValue::from_str(&grpc_timeout::format(left))
                    .expect("digits and a unit are a valid header");
                request.headers_mut().insert(grpc_timeout::HEADER, value);
            }
            let response = inner.ready().await?.call(request).await;
            // Held until the reply's headers: a unary call's whole life.
            drop(slot);
            response
        })
    }
}

fn spent<B: Default>(budget: Duration) -> http::Response<B> {
    Status::deadline_exceeded(format!(
        "waited out the call's deadline ({budget:?}) for a free slot on the service's \
         connection (DOWNSTREAM_MAX_CONCURRENT_CALLS); not sent"
    ))
    .into_http()
}
