//! What a commit waits for before a service answers: the `DURABILITY` setting.
//!
//! The default, `full`, waits for the disk. `relaxed` is an opt-in trade of
//! the last commits on a machine crash for a shorter wait on every commit;
//! `docs/durability.md` states exactly what it can lose. The saga engine has
//! its own `saga_engine::log::Durability` (it is a crate of its own); the
//! orchestrator hands this setting on to it.

/// What a commit waits for before it counts as done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Flushed to the disk before the reply: survives a power loss. SQLite
    /// `synchronous=FULL`; on PostgreSQL the server's own `synchronous_commit`
    /// (`on` by default).
    #[default]
    Full,
    /// Written but not flushed: survives the crash of any of the system's
    /// processes, not that of the machine, nor (on PostgreSQL) that of the
    /// database server. SQLite `synchronous=NORMAL` in WAL mode; PostgreSQL
    /// `synchronous_commit=off`.
    Relaxed,
}

impl Durability {
    /// SQLite's `synchronous` pragma for this durability.
    pub fn sqlite_synchronous(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Relaxed => "NORMAL",
        }
    }

    /// The statement that sets a PostgreSQL session's commits to this
    /// durability; `None` leaves the server's setting, which `Full` keeps
    /// (an operator's `remote_apply` for a synchronous standby stays).
    pub fn postgres_session_setting(self) -> Option<&'static str> {
        match self {
            Durability::Full => None,
            Durability::Relaxed => Some("SET synchronous_commit = off"),
        }
    }

    /// Says at start-up, once, what a relaxed process can lose.
    pub fn announce(self) {
        if self == Durability::Relaxed {
            tracing::warn!(
                "DURABILITY=relaxed: commits are not flushed to disk before they are acknowledged; \
                 a crash of this machine (or of the PostgreSQL server) can lose the last of them \
                 (docs/durability.md)"
            );
        }
    }
}
