//! Which answers are definite, and how long to wait between attempts.
//!
//! The rule: only an answer that proves the action did not happen, and will not
//! happen, is definite. Everything else leaves the outcome unknown. A reset
//! stream, a proxy's error, a timeout, a crash of the callee after its commit:
//! each may hide an effect, so each is retried with the same `request_id`, and
//! a step still unknown after its budget is compensated itself.

use std::time::Duration;

use rand::Rng;
use tonic::Code;

/// The codes that prove the callee refused the action before doing anything.
/// Every other code (INTERNAL included: tonic reports a reset HTTP/2 stream as
/// INTERNAL) leaves the step's outcome unknown.
pub const DEFINITE_CODES: &[Code] = &[
    Code::FailedPrecondition,
    Code::NotFound,
    Code::InvalidArgument,
    Code::AlreadyExists,
    Code::Unauthenticated,
    Code::PermissionDenied,
    Code::Unimplemented,
    Code::OutOfRange,
];

/// What a failed call says about the step's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The action did not and will not happen.
    Definite,
    /// It may have happened, or may still: retry with the same `request_id`.
    Unknown,
}

pub fn classify(code: Code) -> Answer {
    if DEFINITE_CODES.contains(&code) {
        Answer::Definite
    } else {
        Answer::Unknown
    }
}

/// How a step is retried: exponential backoff with equal jitter, each attempt
/// with its own deadline.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Forward attempts per step before its outcome counts as unknown (and the
    /// step is compensated).
    pub max_attempts: u32,
    /// Deadline of each call.
    pub call_timeout: Duration,
    pub initial_backoff: Duration,
    /// Cap of the backoff between forward attempts.
    pub max_backoff: Duration,
    /// Cap of the backoff between compensation attempts, which never give up.
    pub max_compensation_backoff: Duration,
    /// A compensation failing for longer than this is announced as stuck.
    pub compensation_stuck_after: Duration,
    /// A compensation failing for longer than this gives up: the saga ends
    /// NEEDS_ATTENTION for a person to resolve. `None`: it retries forever.
    pub compensation_attention_after: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            call_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            max_compensation_backoff: Duration::from_secs(10),
            compensation_stuck_after: Duration::from_secs(60),
            compensation_attention_after: None,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): with
    /// `ceiling = min(initial * 2^(attempt-1), cap)`, a random time between
    /// half the ceiling and the ceiling ("equal jitter"). The jitter spreads
    /// the retries of many sagas that failed together; the fixed half keeps
    /// the wait growing.
    pub fn backoff(&self, attempt: u32, cap: Duration) -> Duration {
        let ceiling = self.backoff_ceiling(attempt, cap);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }

    fn backoff_ceiling(&self, attempt: u32, cap: Duration) -> Duration {
        self.initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        };
        let cap = Duration::from_millis(1_000);
        for attempt in 1..40u32 {
            let ceiling = Duration::from_millis(10 * (1u64 << (attempt - 1).min(20))).min(cap);
            for _ in 0..50 {
                let wait = policy.backoff(attempt, cap);
                assert!(
                    wait >= ceiling / 2 && wait <= ceiling,
                    "attempt {attempt}: {wait:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
            }
        }
        // Growth: each attempt's shortest wait is at least the previous
        // attempt's longest, until the cap.
        for attempt in 1..7u32 {
            let longest = policy.backoff_ceiling(attempt, cap);
            let next_shortest = policy.backoff_ceiling(attempt + 1, cap) / 2;
            assert!(next_shortest >= longest, "attempt {attempt}");
            assert!(policy.backoff_ceiling(attempt + 1, cap) > longest);
        }
        assert_eq!(policy.backoff_ceiling(30, cap), cap);
    }

    #[test]
    fn only_answers_that_prove_nothing_happened_are_definite() {
        use Answer::{Definite, Unknown};
        let every_code = [
            (Code::Ok, Unknown),
            (Code::Cancelled, Unknown),
            (Code::Unknown, Unknown),
            (Code::InvalidArgument, Definite),
            (Code::DeadlineExceeded, Unknown),
            (Code::NotFound, Definite),
            (Code::AlreadyExists, Definite),
            (Code::PermissionDenied, Definite),
            (Code::ResourceExhausted, Unknown),
            (Code::FailedPrecondition, Definite),
            (Code::Aborted, Unknown),
            (Code::OutOfRange, Definite),
            (Code::Unimplemented, Definite),
            (Code::Internal, Unknown),
            (Code::Unavailable, Unknown),
            (Code::DataLoss, Unknown),
            (Code::Unauthenticated, Definite),
        ];
        for (code, expected) in every_code {
            assert_eq!(classify(code), expected, "{code:?}");
        }
        assert_eq!(every_code.len(), 17, "every gRPC code is pinned");
    }
}
