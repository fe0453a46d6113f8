//! A service's client with its link's slots, for the saga's steps.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::deadline_cap::{HeldSlot, Slots};

/// A step's way to a service: it waits for a slot on the link first, and
/// only then builds tonic's call (the request with its headers and encode
/// buffer, some KiB), boxed. A saga waiting for a busy service then holds a
/// wait of a few bytes instead of a built call; with 10,000 sagas waiting,
/// tens of MB (docs/benchmarks.md).
#[derive(Clone)]
pub struct Lane<C> {
    /// For calls that need no slot of their own first (pricing).
    pub client: C,
    slots: Slots,
}

impl<C: Clone> Lane<C> {
    pub fn new(client: C, slots: Slots) -> Self {
        Lane { client, slots }
    }

    /// `send(client, request)` once a slot is free, with `message` and a
    /// deadline of `timeout` counted from now (the wait included); the
    /// reply's message. DEADLINE_EXCEEDED, nothing sent, when the wait
    /// leaves too little of it (see `deadline_cap`).
    pub async fn call<T, R, F, Fut>(
        &self,
        message: T,
        timeout: Duration,
        send: F,
    ) -> Result<R, Status>
    where
        F: FnOnce(C, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let slot = self.slots.wait(timeout).await?;
        let left = slot.left();
        self.call_in(slot, message, left, send).await
    }

    /// A slot for a call whose deadline is `timeout` from now, for
    /// [`Lane::call_in`]: DEADLINE_EXCEEDED when the wait leaves too
    /// little of it.
    pub async fn slot(&self, timeout: Duration) -> Result<HeldSlot, Status> {
        self.slots.wait(timeout).await
    }

    /// `send(client, request)` in `slot`, with `message` and a deadline of
    /// `timeout` from now; the reply's message.
    pub async fn call_in<T, R, F, Fut>(
        &self,
        slot: HeldSlot,
        message: T,
        timeout: Duration,
        send: F,
    ) -> Result<R, Status>
    where
        F: FnOnce(C, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let mut request = Request::new(message);
        request.set_timeout(timeout);
        request.extensions_mut().insert(slot);
        let reply = Box::pin(send(self.client.clone(), request)).await?;
        Ok(reply.into_inner())
    }
}
