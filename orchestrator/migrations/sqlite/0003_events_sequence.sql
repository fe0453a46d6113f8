-- Each saga counts its own events, so that pruning sent events from the outbox
-- never restarts a saga's sequence at 1 (consumers drop what they have seen).
ALTER TABLE sagas ADD COLUMN events_sequence INTEGER NOT NULL DEFAULT 0;
UPDATE sagas SET events_sequence =
    (SELECT COALESCE(MAX(o.sequence), 0) FROM outbox o WHERE o.aggregate_id = sagas.saga_id);
