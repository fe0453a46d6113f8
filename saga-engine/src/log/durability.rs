//! How far a commit of the log is on its way to the disk when the driver
//! moves on.
//!
//! The default waits for the disk: a step's result is flushed before the next
//! step begins, and survives a power loss. `Relaxed` is an opt-in trade: a
//! commit is handed to the operating system (SQLite) or to the database server
//! (PostgreSQL) and the driver moves on without waiting for the flush. What it
//! can lose is stated in `docs/durability.md`; in short, nothing when one of
//! our processes is killed, the last commits when the machine, or on
//! PostgreSQL the database server, goes down.

/// What a commit of the log waits for before it counts as done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// Flushed to the disk (SQLite `synchronous=FULL`; on PostgreSQL the
    /// server's own `synchronous_commit`, `on` by default).
    #[default]
    Full,
    /// Written, not flushed (SQLite `synchronous=NORMAL` in WAL mode;
    /// PostgreSQL `synchronous_commit=off`): survives the crash of the process
    /// that committed, not that of the machine or of the PostgreSQL server.
    /// On PostgreSQL, the writer halts when the server recovers from a crash
    /// (see `crash_recovery.rs`).
    Relaxed,
}

impl Durability {
    /// SQLite's `synchronous` pragma for this durability (in WAL mode, `NORMAL`
    /// syncs the WAL at checkpoints only).
    pub fn sqlite_synchronous(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Relaxed => "NORMAL",
        }
    }

    /// The `synchronous_commit` the log writer's PostgreSQL sessions set;
    /// `None` leaves the server's own (`on` by default; an operator's
    /// `remote_apply` for a synchronous standby is not weakened).
    pub fn postgres_synchronous_commit(self) -> Option<&'static str> {
        match self {
            Durability::Full => None,
            Durability::Relaxed => Some("off"),
        }
    }
}
