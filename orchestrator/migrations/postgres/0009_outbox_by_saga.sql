-- An event is unique under its saga: (aggregate_id, event_id) in place of
-- event_id alone. As unique as before, since an event's ID is derived from
-- its saga's. An event's ID is a UUIDv5 (a hash), so the index led by it
-- took every new event to a random leaf of an index as large as the outbox,
-- and each leaf first changed after a checkpoint goes whole into the WAL.
-- Led by the saga (a UUIDv7, time-ordered), new entries share the index's
-- last pages, as every other index of the log does (docs/benchmarks.md).
ALTER TABLE outbox ADD CONSTRAINT outbox_aggregate_id_event_id_key UNIQUE (aggregate_id, event_id);
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
