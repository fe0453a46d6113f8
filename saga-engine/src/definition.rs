//! What a saga is, to the engine: a named, ordered list of steps.

use std::{fmt, sync::Arc, time::Duration};

use serde_json::{Map, Value};
use tonic::Status;
use uuid::Uuid;

use crate::log::SagaStatus;

/// Which way a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Forward,
    Compensation,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Compensation => "compensation",
        }
    }

    pub fn parse(value: &str) -> Option<Phase> {
        match value {
            "forward" => Some(Phase::Forward),
            "compensation" => Some(Phase::Compensation),
            _ => None,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt of one step: what the step function needs to make its call.
#[derive(Debug, Clone)]
pub struct Call {
    pub saga_id: Uuid,
    /// Deterministic: the same for every attempt of this step in this phase, and
    /// the same after a restart, so the callee can deduplicate.
    pub request_id: String,
    pub attempt: u32,
    /// Deadline for this attempt's call.
    pub timeout: Duration,
}

impl Call {
    pub fn request_id(saga_id: Uuid, step: &str, phase: Phase) -> String {
        format!("{saga_id}:{step}:{phase}")
    }
}

/// A step of a saga over data `D`: a forward action and its compensation.
///
/// Both must be idempotent under the call's `request_id`, and the compensation
/// must succeed as a no-op when the forward action never took effect (or takes
/// effect late): the engine compensates a step whose outcome is unknown.
#[async_trait::async_trait]
pub trait Step<D>: Send + Sync {
    /// Stable name, recorded in the log; e.g. `"reserve_stock"`.
    fn name(&self) -> &'static str;

    /// Performs the step. Returns a short, human-readable summary of the result
    /// for the log (e.g. a tracking ID), or the callee's status.
    async fn forward(&self, data: &D, call: &Call) -> Result<String, Status>;

    /// Undoes the step.
    async fn compensate(&self, data: &D, call: &Call) -> Result<String, Status>;
}

/// A saga kind: its steps in forward order.
pub struct SagaDefinition<D> {
    /// Stored with each saga, e.g. `"order"`.
    pub kind: &'static str,
    pub steps: Vec<Arc<dyn Step<D>>>,
    /// The name of the pivot step: once it has begun, the saga can no longer
    /// be cancelled (for an order, the charge).
    pub pivot: Option<&'static str>,
    /// Makes the span a saga runs in, with the attributes its kind wants
    /// (e.g. `order_id`). Step attempts are its children. It must declare the
    /// empty fields `trace_id` and `resumed`, which the engine fills, and must
    /// not read the span's OpenTelemetry context (that would fix its parent).
    pub span: fn(Uuid) -> tracing::Span,
    /// The event, if any, this kind publishes for a milestone. It is written to
    /// the outbox in the same transaction as the state change.
    pub announce: fn(&D, &Milestone<'_>) -> Option<Announcement>,
}

/// Something that happened to a saga, which its kind may announce.
#[derive(Debug, Clone)]
pub enum Milestone<'a> {
    /// The saga was recorded and will be driven.
    Started,
    /// The saga reached a terminal state.
    Finished {
        status: SagaStatus,
        failure_reason: &'a str,
    },
    /// A compensation has kept failing for longer than the configured time.
    CompensationStuck {
        step: &'static str,
        attempts: u32,
        last_error: &'a str,
    },
}

impl Milestone<'_> {
    /// What makes this milestone unique within its saga: an event announcing
    /// it has an ID derived from the saga and this key, so that writing it
    /// again (a checkpoint applied twice) changes nothing.
    ///
    /// `epoch` is the one the saga is held at when the milestone is reached.
    /// A saga ends once per epoch: an operator's reopen of a saga that rests
    /// NEEDS_ATTENTION moves it to a new epoch, and its next end (COMPENSATED,
    /// or NEEDS_ATTENTION again) is a new milestone, with an event of its own;
    /// so is a compensation stuck again. With one key for each kind, such an
    /// event was taken for the first one written again and dropped: consumers
    /// never heard how the saga ended. (A replica that takes a saga over also
    /// moves it to a new epoch, so its driver warns of a stuck compensation
    /// once more.) The first epoch keeps the plain keys, so what is reached
    /// there has the ID it always had.
    pub fn key(&self, epoch: i64) -> String {
        let key = match self {
            Milestone::Started => return "started".into(),
            Milestone::Finished { .. } => "finished".to_owned(),
            Milestone::CompensationStuck { step, .. } => format!("compensation_stuck:{step}"),
        };
        match epoch {
            crate::log::FIRST_EPOCH => key,
            later => format!("{key}@{later}"),
        }
    }
}

/// An event to publish: its type (the routing key) and its fields.
#[derive(Debug, Clone)]
pub struct Announcement {
    pub event_type: String,
    pub data: Map<String, Value>,
}

impl<D> SagaDefinition<D> {
    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.name()).collect()
    }

    /// The index of the pivot step.
    pub fn pivot_index(&self) -> Option<usize> {
        let pivot = self.pivot?;
        self.steps.iter().position(|s| s.name() == pivot)
    }

    /// Checks what the engine relies on: at least one step, unique step names
    /// (they are recorded in the log and in each call's `request_id`), and a
    /// pivot that names one of the steps.
    pub fn validate(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err(format!("saga kind {:?} has no steps", self.kind));
        }
        let names = self.step_names();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(format!(
                    "saga kind {:?} has two steps named {name:?}",
                    self.kind
                ));
            }
        }
        if let Some(pivot) = self.pivot
            && self.pivot_index().is_none()
        {
            return Err(format!(
                "saga kind {:?}: the pivot {pivot:?} is not one of its steps {names:?}",
                self.kind
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys at the first epoch are the ones every earlier build wrote (event
    /// IDs derive from them); a later epoch's differ from every other.
    #[test]
    fn a_milestone_at_a_later_epoch_has_a_key_of_its_own() {
        let end = Milestone::Finished {
            status: SagaStatus::NeedsAttention,
            failure_reason: "",
        };
        let stuck = Milestone::CompensationStuck {
            step: "a",
            attempts: 3,
            last_error: "",
        };
        assert_eq!(Milestone::Started.key(1), "started");
        assert_eq!(Milestone::Started.key(7), "started", "a saga starts once");
        assert_eq!(end.key(1), "finished");
        assert_eq!(stuck.key(1), "compensation_stuck:a");
        assert_eq!(end.key(2), "finished@2");
        assert_eq!(stuck.key(3), "compensation_stuck:a@3");
        assert_ne!(end.key(2), end.key(3));
    }
}
