-- The saga engine's tables. A saga's row, its step records and its events
-- change in one transaction; recovery reads only these tables.
-- (The orchestrator creates the same tables through its own migration history.)
CREATE TABLE sagas (
    saga_id          TEXT PRIMARY KEY,
    -- Which saga definition drives it.
    kind             TEXT    NOT NULL,
    -- The saga's input, as JSON; immutable.
    data             TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    -- Running: index of the next step to run. Compensating: index of the next
    -- step to undo (-1 when none is left).
    next_step        BIGINT NOT NULL,
    -- 1 once the pivot step (after which the saga can no longer be cancelled) began.
    pivot_passed     BIGINT NOT NULL DEFAULT 0,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    failure_reason   TEXT    NOT NULL DEFAULT '',
    -- W3C traceparent of the saga's span, so resumed steps join the same trace.
    trace_context    TEXT    NOT NULL DEFAULT '',
    created_at_ms    BIGINT NOT NULL,
    updated_at_ms    BIGINT NOT NULL,
    -- The sequence number of the saga's last event. Kept here, not derived from
    -- the outbox, so that pruning sent events never restarts the count.
    events_sequence  BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX sagas_by_status ON sagas (status);

CREATE TABLE saga_steps (
    saga_id        TEXT    NOT NULL REFERENCES sagas (saga_id),
    phase          TEXT    NOT NULL CHECK (phase IN ('forward', 'compensation')),
    step_index     BIGINT NOT NULL,
    name           TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    attempts       BIGINT NOT NULL,
    last_error     TEXT    NOT NULL DEFAULT '',
    output         TEXT    NOT NULL DEFAULT '',
    started_at_ms  BIGINT,
    finished_at_ms BIGINT,
    PRIMARY KEY (saga_id, phase, step_index)
);

-- The transactional outbox: events written in the same transaction as the
-- state change that causes them, published afterwards by a relay.
CREATE TABLE outbox (
    id            BIGSERIAL PRIMARY KEY,
    -- Derived from the saga and the milestone, so writing it again is a no-op.
    event_id      TEXT    NOT NULL UNIQUE,
    aggregate_id  TEXT    NOT NULL,
    -- 1, 2, 3… per saga, in the order the events happened.
    sequence      BIGINT NOT NULL,
    event_type    TEXT    NOT NULL,
    -- The whole message body, JSON.
    payload       TEXT    NOT NULL,
    traceparent   TEXT    NOT NULL DEFAULT '',
    created_at_ms BIGINT NOT NULL,
    -- Set once the broker has confirmed the publish.
    sent_at_ms    BIGINT,
    UNIQUE (aggregate_id, sequence)
);

CREATE INDEX outbox_unsent ON outbox (sent_at_ms, id);
