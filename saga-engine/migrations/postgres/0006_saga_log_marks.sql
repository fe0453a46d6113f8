-- A mark of each saga log writer whose commits are relaxed
-- (synchronous_commit=off). Unlogged: PostgreSQL empties the table whenever
-- it recovers from a crash (and it is empty on a promoted standby), which is
-- when relaxed commits may have been lost; a clean restart keeps it. The
-- writer looks for its mark on every new connection before it writes on it,
-- and halts when the mark is gone (saga-engine/src/log/crash_recovery.rs).
-- One row per process start; a crash empties it.
CREATE UNLOGGED TABLE saga_log_marks (
    mark          TEXT   PRIMARY KEY,
    written_at_ms BIGINT NOT NULL
);
