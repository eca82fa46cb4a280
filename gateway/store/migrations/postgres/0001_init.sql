-- The schema of the SQLite migrations 0001-0004, in PostgreSQL types. Ids and user ids sort
-- bytewise (COLLATE "C") as they do in SQLite, so listings come out in the same order.
-- `usage` is jsonb (summed per meter in SQL); JSON only read back whole keeps its text (json).

CREATE TABLE api_keys (
    id          text COLLATE "C" PRIMARY KEY,
    user_id     text COLLATE "C" NOT NULL,
    name        text NOT NULL DEFAULT '',
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);
CREATE INDEX ix_api_keys_user ON api_keys (user_id);

-- A finished request, and its place in the Polar outbox (the unit of sync is the request; its
-- events are derived from `usage`, gateway/events.py).
CREATE TABLE requests (
    id               text COLLATE "C" PRIMARY KEY,
    user_id          text COLLATE "C" NOT NULL,
    key_id           text COLLATE "C" NOT NULL,
    provider         text NOT NULL,
    model            text NOT NULL,
    operation        text NOT NULL,
    stream           boolean NOT NULL,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    status_code      integer,
    outcome          text NOT NULL,
    reservation      jsonb NOT NULL DEFAULT '{}',
    usage            jsonb NOT NULL DEFAULT '{}',
    usage_raw        json,
    estimated        boolean NOT NULL DEFAULT false,
    owner            text NOT NULL DEFAULT '',
    sync_state       text NOT NULL DEFAULT 'none',  -- none | pending | claimed | synced | failed
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT '-infinity',
    claimed_by       text,
    claimed_until    timestamptz,
    last_error       text,
    synced_at        timestamptz
);
CREATE INDEX ix_requests_user_started ON requests (user_id, started_at);
CREATE INDEX ix_requests_outbox ON requests (sync_state, next_attempt_at) WHERE sync_state IN ('pending', 'claimed');
CREATE INDEX ix_requests_failed ON requests (started_at) WHERE sync_state = 'failed';

CREATE TABLE customer_limits (
    user_id       text COLLATE "C" PRIMARY KEY,
    meters        json NOT NULL,      -- {meter: {credited, consumed, balance}}
    period_start  timestamptz,
    period_end    timestamptz,
    snapshot_at   timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    active        boolean NOT NULL DEFAULT true
);
CREATE INDEX ix_customer_limits_updated ON customer_limits (updated_at);

CREATE TABLE webhook_deliveries (
    webhook_id    text PRIMARY KEY,
    event_type    text NOT NULL,
    processed_at  timestamptz NOT NULL
);
