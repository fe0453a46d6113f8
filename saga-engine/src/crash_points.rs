//! Named crash points: exact places where a test can abort the process, pause
//! it, or make a point report a failure, instead of killing at a wall-clock time.
//!
//! Compiled in only with the `crash-points` feature, and armed only when the
//! process calls [`arm_from_env`], which only the test build of the binary does.
//! The production binary never reads `CRASH_POINTS`, so a stray variable in a
//! deployment can do nothing.
//!
//! `CRASH_POINTS` is `name=action;name=action`, with actions:
//! - `abort`: `std::process::abort()` at the point (as `kill -9` would, but at
//!   an exact place);
//! - `pause(ms)`: the point sleeps (async) for `ms` milliseconds;
//! - `fail`: the point reports a failure, where the point defines one (e.g. a
//!   commit whose reply is lost).
//!
//! Any action may be prefixed by `N*` to fire only the first N times.

/// The points, by name. Each is placed where a crash is hardest to get right.
pub mod point {
    /// A step's call has replied; its checkpoint is not yet written.
    pub const AFTER_STEP_REPLY: &str = "step.after_reply";
    /// A group commit is durable; the drivers waiting on it are not yet told.
    pub const AFTER_LOG_COMMIT: &str = "log.after_commit";
    /// The same, only for commits that carry events.
    pub const AFTER_LOG_COMMIT_WITH_EVENTS: &str = "log.after_commit_with_events";
    /// A compensation's checkpoint is durable; the next compensation has not begun.
    pub const BETWEEN_COMPENSATIONS: &str = "compensation.between";
    /// A cancel is recorded; the saga's driver has not yet seen it.
    pub const AFTER_CANCEL_ACCEPTED: &str = "cancel.after_accept";
    /// Events are handed to the broker; its confirm has not yet been recorded.
    pub const AFTER_PUBLISH: &str = "outbox.after_publish";
    /// A new saga (e.g. an order's, inside `CreateOrder`) is committed; it is
    /// not yet driven.
    pub const AFTER_START_COMMIT: &str = "start.after_commit";
}

#[cfg(feature = "crash-points")]
mod armed {
    use std::{
        collections::HashMap,
        sync::{
            OnceLock,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        Abort,
        Pause(Duration),
        Fail,
    }

    #[derive(Debug)]
    pub struct Armed {
        pub action: Action,
        /// Times it may still fire; `u64::MAX` for always.
        left: AtomicU64,
    }

    pub static POINTS: OnceLock<HashMap<String, Armed>> = OnceLock::new();

    pub fn parse(spec: &str) -> Result<HashMap<String, Armed>, String> {
        let mut points = HashMap::new();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, action) = entry
                .split_once('=')
                .ok_or_else(|| format!("CRASH_POINTS entry {entry:?} is not name=action"))?;
            let (times, action) = match action.split_once('*') {
                Some((n, rest)) => (
                    n.parse::<u64>()
                        .map_err(|_| format!("CRASH_POINTS: bad count in {entry:?}"))?,
                    rest,
                ),
                None => (u64::MAX, action),
            };
            let action = match action {
                "abort" => Action::Abort,
                "fail" => Action::Fail,
                pause if pause.starts_with("pause(") && pause.ends_with(')') => {
                    let ms = pause["pause(".len()..pause.len() - 1]
                        .parse::<u64>()
                        .map_err(|_| format!("CRASH_POINTS: bad pause in {entry:?}"))?;
                    Action::Pause(Duration::from_millis(ms))
                }
                other => return Err(format!("CRASH_POINTS: unknown action {other:?}")),
            };
            points.insert(
                name.trim().to_owned(),
                Armed {
                    action,
                    left: AtomicU64::new(times),
                },
            );
        }
        Ok(points)
    }

    /// The action to take at `name` now, if it is armed and has firings left.
    pub fn fire(name: &str) -> Option<Action> {
        let armed = POINTS.get()?.get(name)?;
        armed
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                (left > 0).then(|| if left == u64::MAX { left } else { left - 1 })
            })
            .ok()?;
        tracing::warn!(point = name, action = ?armed.action, "crash point fired");
        Some(armed.action)
    }
}

/// Arms the points named in `CRASH_POINTS`. Only the test build calls this.
#[cfg(feature = "crash-points")]
pub fn arm_from_env() -> Result<(), String> {
    let spec = std::env::var("CRASH_POINTS").unwrap_or_default();
    let points = armed::parse(&spec)?;
    let _ = armed::POINTS.set(points);
    Ok(())
}

/// Passes the point: aborts or pauses if armed so. Returns `true` if it is
/// armed to `fail`, for points that can report a failure.
pub async fn reach(name: &'static str) -> bool {
    #[cfg(feature = "crash-points")]
    match armed::fire(name) {
        Some(armed::Action::Abort) => std::process::abort(),
        Some(armed::Action::Pause(wait)) => tokio::time::sleep(wait).await,
        Some(armed::Action::Fail) => return true,
        None => {}
    }
    let _ = name;
    false
}

#[cfg(all(test, feature = "crash-points"))]
mod tests {
    use super::armed::{Action, parse};

    #[test]
    fn parses_actions_and_counts() {
        let points = parse("a=abort; b=2*pause(150);c=fail").unwrap();
        assert_eq!(points.len(), 3);
        assert_eq!(points["a"].action, Action::Abort);
        assert_eq!(
            points["b"].action,
            Action::Pause(std::time::Duration::from_millis(150))
        );
        assert_eq!(points["c"].action, Action::Fail);
        assert!(parse("a=explode").unwrap_err().contains("unknown action"));
        assert!(parse("a").unwrap_err().contains("name=action"));
        assert!(parse("a=x*abort").unwrap_err().contains("bad count"));
    }
}
