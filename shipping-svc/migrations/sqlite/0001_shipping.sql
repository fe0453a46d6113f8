-- One row per order that shipping has heard of. A 'cancelled' row with an empty
-- shipment_id is the tombstone of a cancellation that came before its shipment.
CREATE TABLE shipments (
    order_id      TEXT PRIMARY KEY,
    shipment_id   TEXT    NOT NULL,
    tracking_id   TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN ('prepared', 'cancelled')),
    recipient     TEXT    NOT NULL,
    line1         TEXT    NOT NULL,
    city          TEXT    NOT NULL,
    postal_code   TEXT    NOT NULL,
    country       TEXT    NOT NULL,
    service_level INTEGER NOT NULL,
    item_count    INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

CREATE TABLE idempotency (
    request_id     TEXT PRIMARY KEY,
    method         TEXT    NOT NULL,
    fingerprint    BLOB    NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    status_code    INTEGER,
    status_message TEXT,
    reply          BLOB
);
