-- Replicas: several engines on one database each drive their own sagas.
-- A saga's `owner` is the replica that drives it and `epoch` counts how often
-- it changed hands; every write a driver makes is conditional on the epoch it
-- claimed, so a replica that lost a saga can no longer write to it.
ALTER TABLE sagas ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE sagas ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;
-- The epoch each step record and each event was written under, so that who
-- drove a saga when can be checked from the log.
ALTER TABLE saga_steps ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;
ALTER TABLE outbox ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;

CREATE INDEX sagas_open_by_owner ON sagas (owner) WHERE status IN ('RUNNING', 'COMPENSATING');

-- One row per live replica: its lease ends at `lease_until_ms` (the
-- database's clock) unless it renews it. `incarnation` tells a restarted
-- replica from the one it replaces.
CREATE TABLE saga_replicas (
    replica_id      TEXT   PRIMARY KEY,
    incarnation     TEXT   NOT NULL,
    lease_until_ms  BIGINT NOT NULL,
    started_at_ms   BIGINT NOT NULL
);
