-- The attempts of a step that took more than one, each with its times and
-- its error (empty for the attempt that settled it), for the saga's history.
-- A step settled by its first attempt has none: its record says it all.
-- Written with the step's checkpoints, never on their own; a step keeps at
-- most its first 100 attempts here (its record counts them all).
CREATE TABLE saga_attempts (
    saga_id        TEXT   NOT NULL,
    phase          TEXT   NOT NULL,
    step_index     BIGINT NOT NULL,
    attempt        BIGINT NOT NULL,
    started_at_ms  BIGINT NOT NULL,
    finished_at_ms BIGINT NOT NULL,
    error          TEXT   NOT NULL,
    PRIMARY KEY (saga_id, phase, step_index, attempt)
);
