-- The saga engine's durable log. A saga's row and its step records change in
-- the same transaction; recovery reads only these two tables.
CREATE TABLE sagas (
    saga_id          TEXT PRIMARY KEY,
    -- Which saga definition drives it, e.g. 'order'.
    kind             TEXT    NOT NULL,
    -- The saga's input, as JSON; immutable.
    data             TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    -- Forward: index of the next step to run. Compensating: index of the next
    -- step to undo (-1 when none is left).
    next_step        INTEGER NOT NULL,
    -- 1 once the pivot step (after which the saga can no longer be cancelled) began.
    pivot_passed     INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    failure_reason   TEXT    NOT NULL DEFAULT '',
    -- W3C traceparent of the saga's span, so resumed steps join the same trace.
    trace_context    TEXT    NOT NULL DEFAULT '',
    created_at_ms    INTEGER NOT NULL,
    updated_at_ms    INTEGER NOT NULL
);

CREATE INDEX sagas_by_status ON sagas (status);

CREATE TABLE saga_steps (
    saga_id        TEXT    NOT NULL REFERENCES sagas (saga_id),
    phase          TEXT    NOT NULL CHECK (phase IN ('forward', 'compensation')),
    step_index     INTEGER NOT NULL,
    name           TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    attempts       INTEGER NOT NULL,
    last_error     TEXT    NOT NULL DEFAULT '',
    output         TEXT    NOT NULL DEFAULT '',
    started_at_ms  INTEGER,
    finished_at_ms INTEGER,
    PRIMARY KEY (saga_id, phase, step_index)
);

-- Orders: the client's idempotency key and what ListOrders filters on. The
-- order's full content is the saga's data.
CREATE TABLE orders (
    order_id      TEXT PRIMARY KEY REFERENCES sagas (saga_id),
    request_id    TEXT    NOT NULL UNIQUE,
    fingerprint   BLOB    NOT NULL,
    customer_id   TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL
);

CREATE INDEX orders_by_customer ON orders (customer_id, created_at_ms);
CREATE INDEX orders_by_time ON orders (created_at_ms);
