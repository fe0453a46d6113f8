-- A stored refusal keeps its rich error details (google.rpc.Status details:
-- the ErrorInfo reason, the BadRequest field), so that a replay of the
-- request_id answers exactly as the first time.
ALTER TABLE idempotency ADD COLUMN status_details BLOB;
