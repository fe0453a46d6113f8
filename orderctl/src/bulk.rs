//! `orderctl bulk retry|cancel`: one operator action on every order a filter
//! matches.
//!
//! The matching orders are listed first, once (a `--dry-run` stops there and
//! prints them). Each then gets its own call, a few at a time, with the
//! request ID `<batch>:<order>`: the same `--batch-id` run again replays the
//! orders already done instead of acting twice, so an interrupted bulk run
//! is finished by running it again. An order that no longer fits the action
//! (it moved on since the listing) is refused by the server and counted as
//! skipped, with the reason; any other refusal counts as failed.

use futures::{StreamExt as _, stream};
use indicatif::{ProgressBar, ProgressStyle};
use ordersaga_proto::{client::OrderClient, orders::v1::Order};
use serde_json::json;
use tonic::{Code, Status};

/// Calls in flight at once: enough to be quick, few enough to leave the
/// orchestrator to the orders.
const IN_FLIGHT: usize = 8;

#[derive(Debug, Clone)]
pub enum Action {
    /// RetryCompensation (admin key).
    Retry,
    /// CancelOrder, with this reason.
    Cancel { reason: String },
}

impl Action {
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Cancel { .. } => "cancel",
        }
    }
}

/// What became of each order.
#[derive(Debug, Default)]
pub struct Outcome {
    pub done: Vec<String>,
    /// Refused as no longer fitting the action (FAILED_PRECONDITION): moved on.
    pub skipped: Vec<(String, String)>,
    pub failed: Vec<(String, Status)>,
}

impl Outcome {
    pub fn to_json(&self, action: &Action, batch_id: &str) -> serde_json::Value {
        json!({
            "action": action.verb(),
            "batchId": batch_id,
            "done": self.done,
            "skipped": self.skipped.iter().map(|(id, why)| json!({"orderId": id, "reason": why})).collect::<Vec<_>>(),
            "failed": self.failed.iter().map(|(id, status)| json!({
                "orderId": id,
                "code": format!("{:?}", status.code()),
                "message": status.message(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The request ID of `order_id`'s action in batch `batch_id`.
pub fn request_id(batch_id: &str, order_id: &str) -> String {
    format!("{batch_id}:{order_id}")
}

/// Acts on every order, [`IN_FLIGHT`] at a time, with a progress bar.
pub async fn act(
    actor: &OrderClient,
    action: &Action,
    orders: &[Order],
    batch_id: &str,
) -> Outcome {
    let bar = ProgressBar::new(orders.len() as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(action.verb());
    let calls = orders.iter().map(|order| {
        let (order_id, request_id) = (
            order.order_id.clone(),
            request_id(batch_id, &order.order_id),
        );
        let bar = bar.clone();
        async move {
            let result = match action {
                Action::Retry => actor.retry_compensation(&order_id, request_id).await,
                Action::Cancel { reason } => {
                    actor.cancel_order(&order_id, request_id, reason).await
                }
            };
            bar.inc(1);
            (order_id, result)
        }
    });
    let mut outcome = Outcome::default();
    let mut results = stream::iter(calls).buffer_unordered(IN_FLIGHT);
    while let Some((order_id, result)) = results.next().await {
        match result {
            Ok(_) => outcome.done.push(order_id),
            Err(status) if status.code() == Code::FailedPrecondition => outcome
                .skipped
                .push((order_id, status.message().to_owned())),
            Err(status) => outcome.failed.push((order_id, status)),
        }
    }
    bar.finish_and_clear();
    outcome
}
