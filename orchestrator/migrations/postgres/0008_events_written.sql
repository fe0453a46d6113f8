-- Which of the given event IDs the outbox holds already: the log's statements
-- number only the events not written before (see `fresh_events_ctes`).
--
-- Its own function, so that the lookup is planned with sequential scans off
-- wherever it runs. A prepared statement keeps the plan it was given after
-- its first few runs until its tables are next analyzed, and on a new
-- database that plan was made while the outbox was nearly empty: a scan of
-- the whole outbox, at every batch, at a cost that grew with every event,
-- until autovacuum came by (a minute at the least). `SET LOCAL` in the
-- batch's transaction prevented it, but a batch that commits as its one
-- statement has no transaction to set it in. PL/pgSQL keeps its plans for
-- the session, made under the function's own settings; SQL would plan its
-- body again at every call.
CREATE FUNCTION saga_events_written(ids TEXT[]) RETURNS SETOF TEXT
LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
BEGIN
  RETURN QUERY SELECT o.event_id FROM outbox o WHERE o.event_id = ANY(ids);
END
$$;
