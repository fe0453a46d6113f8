CREATE TABLE products (
    sku              TEXT PRIMARY KEY,
    name             TEXT    NOT NULL,
    unit_price_cents BIGINT NOT NULL CHECK (unit_price_cents > 0),
    currency         TEXT    NOT NULL,
    available        BIGINT NOT NULL CHECK (available >= 0),
    reserved         BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    created_at_ms    BIGINT NOT NULL,
    updated_at_ms    BIGINT NOT NULL
);

-- One row per order that stock has heard of. A 'released' row with no lines is the
-- tombstone of a release that came before its reservation.
CREATE TABLE reservations (
    order_id       TEXT PRIMARY KEY,
    reservation_id TEXT    NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('reserved', 'released')),
    total_cents    BIGINT NOT NULL,
    currency       TEXT    NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);

CREATE TABLE reservation_lines (
    order_id         TEXT    NOT NULL REFERENCES reservations (order_id),
    sku              TEXT    NOT NULL REFERENCES products (sku),
    quantity         BIGINT NOT NULL CHECK (quantity > 0),
    unit_price_cents BIGINT NOT NULL,
    PRIMARY KEY (order_id, sku)
);

CREATE TABLE idempotency (
    request_id     TEXT PRIMARY KEY,
    method         TEXT    NOT NULL,
    fingerprint    BYTEA    NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    status_code    BIGINT,
    status_message TEXT,
    reply          BYTEA
);
