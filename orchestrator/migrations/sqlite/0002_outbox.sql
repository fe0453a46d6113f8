-- The transactional outbox: order events written in the same transaction as
-- the state change that causes them, published to RabbitMQ by the relay.
CREATE TABLE outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT    NOT NULL UNIQUE,
    aggregate_id  TEXT    NOT NULL,
    -- 1, 2, 3… per aggregate (order), in the order the events happened.
    sequence      INTEGER NOT NULL,
    event_type    TEXT    NOT NULL,
    -- The whole message body, JSON (docs/events.md).
    payload       TEXT    NOT NULL,
    traceparent   TEXT    NOT NULL DEFAULT '',
    created_at_ms INTEGER NOT NULL,
    -- Set once the broker has confirmed the publish.
    sent_at_ms    INTEGER,
    UNIQUE (aggregate_id, sequence)
);

CREATE INDEX outbox_unsent ON outbox (sent_at_ms, id);
