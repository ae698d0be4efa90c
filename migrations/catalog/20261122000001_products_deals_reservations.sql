-- Portable SQL: the same migrations run on PostgreSQL and SQLite. Times are
-- Unix epoch milliseconds (BIGINT) so one repository reads both backends.
CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    image_url   TEXT,
    price_cents BIGINT NOT NULL CHECK (price_cents > 0),
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- remaining_stock is the source of truth for what can still be sold; the
-- CHECK is the backstop behind the conditional decrement.
CREATE TABLE deals (
    id              TEXT PRIMARY KEY,
    product_id      TEXT NOT NULL REFERENCES products (id),
    price_cents     BIGINT NOT NULL CHECK (price_cents > 0),
    stock           BIGINT NOT NULL CHECK (stock > 0),
    remaining_stock BIGINT NOT NULL CHECK (remaining_stock >= 0 AND remaining_stock <= stock),
    per_user_limit  BIGINT NOT NULL CHECK (per_user_limit >= 1 AND per_user_limit <= stock),
    starts_at       BIGINT NOT NULL,
    ends_at         BIGINT NOT NULL,
    version         BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    CHECK (ends_at > starts_at)
);

CREATE INDEX deals_by_start ON deals (starts_at, id);
CREATE INDEX deals_by_product ON deals (product_id, starts_at, id);

-- Units each user holds per deal, kept in the same transaction as the stock.
CREATE TABLE deal_holdings (
    deal_id TEXT NOT NULL REFERENCES deals (id),
    user_id TEXT NOT NULL,
    held    BIGINT NOT NULL CHECK (held >= 0),
    PRIMARY KEY (deal_id, user_id)
);

-- One row per reservation_id, the idempotency key. A release of an id never
-- reserved leaves a tombstone (quantity 0, released) so the id can never take
-- stock later.
CREATE TABLE reservations (
    id               TEXT PRIMARY KEY,
    deal_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    quantity         BIGINT NOT NULL CHECK (quantity >= 0),
    unit_price_cents BIGINT NOT NULL,
    remaining_after  BIGINT NOT NULL,
    reserved_at      BIGINT NOT NULL,
    released_at      BIGINT
);
