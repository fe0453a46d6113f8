//! Which errors are worth retrying, and how long to wait between attempts.

use std::time::Duration;

use rand::Rng;
use tonic::Code;

/// Codes after which the step's outcome is unknown or the callee was briefly
/// unable to answer: retried with the same `request_id`. Every other code is a
/// definite answer.
///
/// CANCELLED is here because tonic reports a server-side timeout as CANCELLED;
/// UNKNOWN because a broken connection can surface as UNKNOWN.
pub const TRANSIENT_CODES: &[Code] = &[
    Code::Unavailable,
    Code::DeadlineExceeded,
    Code::ResourceExhausted,
    Code::Aborted,
    Code::Cancelled,
    Code::Unknown,
];

pub fn is_transient(code: Code) -> bool {
    TRANSIENT_CODES.contains(&code)
}

/// How a step is retried: exponential backoff with full jitter, each attempt
/// with its own deadline.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Forward attempts per step before its outcome counts as unknown (a failure).
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
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): a random time up
    /// to `initial * 2^(attempt-1)`, capped. Jitter spreads the retries of many
    /// sagas that failed together.
    pub fn backoff(&self, attempt: u32, cap: Duration) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let ceiling = exp.min(cap);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy::default();
        let cap = Duration::from_millis(100);
        for attempt in 1..40 {
            assert!(policy.backoff(attempt, cap) <= cap);
        }
        assert!(policy.backoff(1, cap) <= policy.initial_backoff);
    }

    #[test]
    fn only_transient_codes_are_retried() {
        assert!(is_transient(Code::Unavailable));
        assert!(!is_transient(Code::FailedPrecondition));
        assert!(!is_transient(Code::NotFound));
    }
}
