CREATE TABLE accounts (
    customer_id   TEXT PRIMARY KEY,
    balance_cents INTEGER NOT NULL CHECK (balance_cents >= 0),
    currency      TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

-- One row per order that payment has heard of. A 'refunded' row with an empty
-- payment_id is the tombstone of a refund that came before its charge.
CREATE TABLE charges (
    order_id      TEXT PRIMARY KEY,
    payment_id    TEXT    NOT NULL,
    customer_id   TEXT    NOT NULL,
    amount_cents  INTEGER NOT NULL,
    currency      TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('charged', 'refunded')),
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

CREATE INDEX charges_by_customer ON charges (customer_id, status);

CREATE TABLE idempotency (
    request_id     TEXT PRIMARY KEY,
    method         TEXT    NOT NULL,
    fingerprint    BLOB    NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    status_code    INTEGER,
    status_message TEXT,
    reply          BLOB
);
