-- An event's ID is unique within its saga, not across the whole outbox.
--
-- The ID is derived from the saga's ID and the milestone (UUIDv5), so it is
-- as unique under the saga as it was alone; but a UUIDv5 is a hash, and an
-- index led by it took each new event to a random page of the index. At 64
-- sagas at a time, that index was 30 % of the pages every commit of the log
-- wrote (docs/benchmarks.md). Led by the saga's ID (a UUIDv7, in time
-- order), a new event's entry lands beside its saga's others, on the few
-- pages where the sagas of the moment are.
--
-- SQLite cannot drop the index of a UNIQUE column: the table is rebuilt, with
-- its rows and ids, and AUTOINCREMENT's mark (ids of pruned events are never
-- given again).
CREATE TABLE outbox_by_saga (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Derived from the saga and the milestone, so writing it again is a no-op.
    event_id      TEXT    NOT NULL,
    aggregate_id  TEXT    NOT NULL,
    -- 1, 2, 3… per saga, in the order the events happened.
    sequence      INTEGER NOT NULL,
    event_type    TEXT    NOT NULL,
    -- The whole message body, JSON.
    payload       TEXT    NOT NULL,
    traceparent   TEXT    NOT NULL DEFAULT '',
    created_at_ms INTEGER NOT NULL,
    -- Set once the broker has confirmed the publish.
    sent_at_ms    INTEGER,
    epoch         BIGINT  NOT NULL DEFAULT 1,
    UNIQUE (aggregate_id, sequence),
    UNIQUE (aggregate_id, event_id)
);
INSERT INTO outbox_by_saga
    (id, event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, sent_at_ms, epoch)
    SELECT id, event_id, aggregate_id, sequence, event_type, payload, traceparent, created_at_ms, sent_at_ms, epoch
    FROM outbox;
DELETE FROM sqlite_sequence WHERE name = 'outbox_by_saga';
INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox_by_saga', seq FROM sqlite_sequence WHERE name = 'outbox';
DROP TABLE outbox;
ALTER TABLE outbox_by_saga RENAME TO outbox;
CREATE INDEX outbox_unsent ON outbox (sent_at_ms, id);
