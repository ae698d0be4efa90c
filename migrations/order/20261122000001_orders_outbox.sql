-- Portable SQL: the same migrations run on PostgreSQL and SQLite. Times are
-- Unix epoch milliseconds (BIGINT).

-- One row per (user, idempotency key). A request claims its key with one
-- INSERT ... ON CONFLICT DO NOTHING; the winner owns the attempt until
-- lease_until. The attempt's order and reservation ids are chosen at claim
-- time, so whoever finishes or sweeps the attempt acts on the same ids.
-- state: 'in_progress' → 'completed' (order_id written) or 'refused'
-- (the refusal kept so a retry gets the same answer).
CREATE TABLE idempotency_keys (
    user_id        TEXT NOT NULL,
    idem_key       TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('in_progress', 'completed', 'refused')),
    order_id       TEXT NOT NULL,
    reservation_id TEXT NOT NULL UNIQUE,
    refusal        TEXT,
    lease_until    BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);

CREATE INDEX idempotency_keys_by_lease ON idempotency_keys (state, lease_until);
CREATE INDEX idempotency_keys_by_expiry ON idempotency_keys (expires_at);

-- ids are UUIDv7, so id order is creation order: the (user_id, id) index
-- serves "newest first" keyset pages.
CREATE TABLE orders (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('confirmed', 'cancelled')),
    total_cents     BIGINT NOT NULL,
    idempotency_key TEXT NOT NULL,
    version         BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

CREATE INDEX orders_by_user ON orders (user_id, id);

CREATE TABLE order_items (
    order_id         TEXT NOT NULL REFERENCES orders (id),
    line             BIGINT NOT NULL,
    deal_id          TEXT NOT NULL,
    product_id       TEXT NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity >= 1),
    unit_price_cents BIGINT NOT NULL,
    reservation_id   TEXT NOT NULL UNIQUE,
    PRIMARY KEY (order_id, line)
);

-- Events written in the same transaction as the order change they report.
-- The relay publishes a row only when no earlier version of the same order
-- is still unpublished, so each order's events leave in order.
CREATE TABLE outbox (
    event_id     TEXT PRIMARY KEY,
    order_id     TEXT NOT NULL,
    version      BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    payload      BYTEA NOT NULL,
    traceparent  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    published_at BIGINT,
    UNIQUE (order_id, version)
);

CREATE INDEX outbox_unpublished ON outbox (published_at, created_at);

-- Reservations to give back to the catalog: written in the transaction that
-- decides it (a cancel, a swept claim), removed once the catalog confirms.
CREATE TABLE stock_releases (
    reservation_id TEXT PRIMARY KEY,
    attempts       BIGINT NOT NULL,
    next_at        BIGINT NOT NULL,
    created_at     BIGINT NOT NULL
);

-- What the order-status projector last applied per order (version-guarded,
-- so replays and reordering cannot move it backwards).
CREATE TABLE order_status (
    order_id   TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    version    BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE deal_sales (
    deal_id          TEXT PRIMARY KEY,
    units_sold       BIGINT NOT NULL,
    orders_confirmed BIGINT NOT NULL,
    orders_cancelled BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

-- Event ids a consumer has applied, written in the same transaction as the
-- effect: the dedupe that makes at-least-once delivery count once.
CREATE TABLE consumed_events (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);

-- Events no consumer could apply (embedded mode; with Redis they go to the
-- dead-letter stream).
CREATE TABLE dead_letters (
    event_id   TEXT NOT NULL,
    consumer   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    payload    BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
