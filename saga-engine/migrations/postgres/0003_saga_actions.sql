-- What operators did to sagas that rest NEEDS_ATTENTION: each action once
-- per request_id (its idempotency key), kept as the saga's history.
CREATE TABLE saga_actions (
    request_id  TEXT   PRIMARY KEY,
    saga_id     TEXT   NOT NULL,
    action      TEXT   NOT NULL,
    note        TEXT   NOT NULL,
    at_ms       BIGINT NOT NULL
);
CREATE INDEX saga_actions_by_saga ON saga_actions (saga_id);
