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
//!
//! A caller may also wait for its slot before it builds the call
//! ([`Slots::wait`]), under the same rules, and hand it over in the call's
//! extensions ([`HeldSlot`]): a call waiting here has already built its
//! request, headers and encode buffer, some KiB, while a wait for a slot is a
//! few bytes. With 10,000 sagas against a busy service, that is the
//! difference between the calls in flight and every saga holding a call.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::HeaderValue;
use svc_kit::grpc_timeout;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tonic::Status;
use tower::{Service, ServiceExt};

/// Less than this left of a deadline after the wait for a slot: not sent.
/// A round trip to a busy service takes longer; sending would only open a
/// stream to reset it.
pub const MIN_BUDGET: Duration = Duration::from_millis(50);

/// The slots of one service's link: at most so many calls in flight.
#[derive(Clone)]
pub struct Slots(Arc<Semaphore>);

impl Slots {
    pub fn new(limit: usize) -> Self {
        Slots(Arc::new(Semaphore::new(limit)))
    }

    /// A slot for a call whose deadline is `budget` from now, and what is
    /// left of it once the slot is free; DEADLINE_EXCEEDED (nothing sent)
    /// when less than [`MIN_BUDGET`] would be left.
    pub async fn wait(&self, budget: Duration) -> Result<HeldSlot, Status> {
        let (permit, left) = self
            .acquire(Some(budget), Instant::now())
            .await
            .map_err(spent_status)?;
        Ok(HeldSlot {
            permit: Arc::new(Mutex::new(Some(permit))),
            left: left.unwrap_or(budget),
        })
    }

    /// Waits for a slot; with a `budget` (counted from `arrived`), at most
    /// until less than [`MIN_BUDGET`] of it would be left, and returns what
    /// is left. `Err(budget)` when it ran out.
    async fn acquire(
        &self,
        budget: Option<Duration>,
        arrived: Instant,
    ) -> Result<(OwnedSemaphorePermit, Option<Duration>), Duration> {
        let Some(budget) = budget else {
            let permit = self.0.clone().acquire_owned().await;
            return Ok((permit.expect("the semaphore is never closed"), None));
        };
        let wait = budget.saturating_sub(MIN_BUDGET);
        let permit = tokio::time::timeout(wait, self.0.clone().acquire_owned())
            .await
            .map_err(|_| budget)?
            .expect("the semaphore is never closed");
        let left = budget.saturating_sub(arrived.elapsed());
        if left < MIN_BUDGET {
            return Err(budget);
        }
        Ok((permit, Some(left)))
    }
}

/// A slot taken before its call was built ([`Slots::wait`]). Put in the
/// call's extensions, it is the call's slot in [`DeadlineCap`], which then
/// does not wait for another. Dropped with an unsent call, it frees the slot.
#[derive(Clone)]
pub struct HeldSlot {
    // Extensions must be `Clone`; the permit goes to whoever takes it first.
    permit: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    left: Duration,
}

impl HeldSlot {
    /// What was left of the call's deadline when the slot came free: the
    /// call's own deadline, so the service's fires before the caller's.
    pub fn left(&self) -> Duration {
        self.left
    }

    fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.permit.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[derive(Clone)]
pub struct DeadlineCap<S> {
    inner: S,
    slots: Slots,
}

impl<S> DeadlineCap<S> {
    /// At most as many calls in flight through `inner` as `slots` has.
    pub fn new(inner: S, slots: Slots) -> Self {
        DeadlineCap { inner, slots }
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
        // Its caller waited for it already, its timeout set to what was left.
        let held = request
            .extensions_mut()
            .remove::<HeldSlot>()
            .and_then(|held| held.take());
        let (slots, mut inner) = (self.slots.clone(), self.inner.clone());
        Box::pin(async move {
            let slot = match held {
                Some(slot) => slot,
                None => match slots.acquire(budget, arrived).await {
                    Err(budget) => return Ok(spent_status(budget).into_http()),
                    Ok((slot, left)) => {
                        if let Some(left) = left {
                            let value = HeaderValue::from_str(&grpc_timeout::format(left))
                                .expect("digits and a unit are a valid header");
                            request.headers_mut().insert(grpc_timeout::HEADER, value);
                        }
                        slot
                    }
                },
            };
            let response = inner.ready().await?.call(request).await;
            // Held until the reply's headers: a unary call's whole life.
            drop(slot);
            response
        })
    }
}

fn spent_status(budget: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "waited out the call's deadline ({budget:?}) for a free slot on the service's \
         connection (DOWNSTREAM_MAX_CONCURRENT_CALLS); not sent"
    ))
}
