-- Core schema: keys, requests in flight and finished, usage events (the Polar outbox), cached
-- Polar limits and processed webhooks. Timestamps are ISO-8601 UTC text ("...Z"), so they sort
-- and compare as strings. Ids are time-ordered; small rows keyed by them are stored WITHOUT ROWID
-- so an insert touches one B-tree fewer and appends.

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    name        TEXT NOT NULL DEFAULT '',
    prefix      TEXT NOT NULL,
    key_hash    BLOB NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE INDEX ix_api_keys_user ON api_keys (user_id);

-- A request is written here (durably) before it is forwarded, and removed when its final row
-- lands in `requests`; what a crash leaves here is settled at the next start.
CREATE TABLE in_flight (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    provider     TEXT NOT NULL,
    model        TEXT NOT NULL,
    operation    TEXT NOT NULL,
    stream       INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    reservation  TEXT NOT NULL,
    owner        TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE requests (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    provider     TEXT NOT NULL,
    model        TEXT NOT NULL,
    operation    TEXT NOT NULL,
    stream       INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    status_code  INTEGER,
    outcome      TEXT NOT NULL,
    reservation  TEXT NOT NULL DEFAULT '{}',
    usage        TEXT NOT NULL DEFAULT '{}',
    usage_raw    TEXT,
    estimated    INTEGER NOT NULL DEFAULT 0,
    owner        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX ix_requests_user_started ON requests (user_id, started_at);

-- Events of a request are found by the external id prefix (`<request id>:`) on the primary key.
CREATE TABLE usage_events (
    external_id      TEXT PRIMARY KEY,
    request_id       TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    meter            TEXT NOT NULL,
    value            INTEGER NOT NULL,
    model            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    ts               TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',  -- pending | claimed | synced | failed
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL DEFAULT '',
    claimed_by       TEXT,
    claimed_until    TEXT,
    last_error       TEXT,
    synced_at        TEXT
) WITHOUT ROWID;
CREATE INDEX ix_usage_events_user_meter_ts ON usage_events (user_id, meter, ts);
CREATE INDEX ix_usage_events_outbox ON usage_events (state, next_attempt_at) WHERE state IN ('pending', 'claimed');

CREATE TABLE customer_limits (
    user_id       TEXT PRIMARY KEY,
    meters        TEXT NOT NULL,      -- JSON {meter: {credited, consumed, balance}}
    period_start  TEXT,
    period_end    TEXT,
    snapshot_at   TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    active        INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE webhook_deliveries (
    webhook_id    TEXT PRIMARY KEY,
    event_type    TEXT NOT NULL,
    processed_at  TEXT NOT NULL
);
