//! Where a saga stands, as the driver sees it. The log stores it as the saga's
//! status and `next_step` (with -1 for "nothing left to undo"); this type is
//! the only place that translates between the two.

use crate::log::SagaStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Running; `step` is the next step to run, or every step is done when it
    /// equals the number of steps.
    Forward {
        step: usize,
        /// Whether the step's call may already have been sent. A driver that
        /// resumes a saga from the log can't know, so a cancel then
        /// compensates the step too; a driver that just moved the cursor to
        /// the step (and committed that) knows it was not.
        maybe_sent: bool,
    },
    /// Compensating; `step` is the next step to undo, `None` when none is left.
    Compensating { step: Option<usize> },
    /// Terminal.
    Finished(SagaStatus),
}

impl Cursor {
    /// The cursor a stored saga resumes at.
    pub fn from_log(
        status: SagaStatus,
        next_step: i64,
        step_count: usize,
    ) -> Result<Cursor, String> {
        let in_range = |i: i64| usize::try_from(i).ok().filter(|&i| i <= step_count);
        match status {
            SagaStatus::Running => in_range(next_step)
                .map(|step| Cursor::Forward {
                    step,
                    maybe_sent: true,
                })
                .ok_or_else(|| format!("a running saga's next step {next_step} is out of range")),
            SagaStatus::Compensating if next_step < 0 => Ok(Cursor::Compensating { step: None }),
            SagaStatus::Compensating => in_range(next_step)
                .filter(|&step| step < step_count)
                .map(|step| Cursor::Compensating { step: Some(step) })
                .ok_or_else(|| {
                    format!("a compensating saga's next step {next_step} is out of range")
                }),
            terminal => Ok(Cursor::Finished(terminal)),
        }
    }

    /// The saga's status in the log.
    pub fn status(&self) -> SagaStatus {
        match self {
            Cursor::Forward { .. } => SagaStatus::Running,
            Cursor::Compensating { .. } => SagaStatus::Compensating,
            Cursor::Finished(status) => *status,
        }
    }

    /// The `next_step` column: the step's index, -1 for none.
    pub fn next_step_column(&self) -> Option<i64> {
        match self {
            Cursor::Forward { step, .. } => Some(*step as i64),
            Cursor::Compensating { step } => Some(step.map_or(-1, |s| s as i64)),
            Cursor::Finished(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_log_columns() {
        for cursor in [
            Cursor::Forward {
                step: 0,
                maybe_sent: true,
            },
            Cursor::Forward {
                step: 3,
                maybe_sent: true,
            },
            Cursor::Compensating { step: Some(2) },
            Cursor::Compensating { step: None },
        ] {
            let back =
                Cursor::from_log(cursor.status(), cursor.next_step_column().unwrap(), 3).unwrap();
            assert_eq!(back, cursor);
        }
        assert!(Cursor::from_log(SagaStatus::Running, 4, 3).is_err());
        assert!(Cursor::from_log(SagaStatus::Running, -1, 3).is_err());
        assert!(Cursor::from_log(SagaStatus::Compensating, 3, 3).is_err());
        assert_eq!(
            Cursor::from_log(SagaStatus::Cancelled, -1, 3).unwrap(),
            Cursor::Finished(SagaStatus::Cancelled)
        );
    }
}
