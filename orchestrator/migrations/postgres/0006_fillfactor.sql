-- Room on every page for a saga's row and its step records to be updated in
-- place. A saga's row is updated at every checkpoint and each step record
-- two or three times; on full pages (the default fillfactor of 100) most
-- updates moved the row to another page and wrote a new entry in every index
-- (a non-HOT update). With 30% free, 97% of the step records' updates and
-- most of the sagas' stay on their page (docs/benchmarks.md). Pages written
-- before this migration keep their fill until they are rewritten.
-- (PostgreSQL only: SQLite has no such setting.)
ALTER TABLE sagas SET (fillfactor = 70);
ALTER TABLE saga_steps SET (fillfactor = 70);
