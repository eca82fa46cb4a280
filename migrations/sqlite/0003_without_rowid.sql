-- Small rows keyed by a text id: store them in their primary-key B-tree (WITHOUT ROWID), so an
-- insert touches one B-tree fewer. Ids are time-ordered, so inserts append.

CREATE TABLE in_flight_new (
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
INSERT INTO in_flight_new (id, user_id, key_id, provider, model, operation, stream, started_at, reservation, owner)
    SELECT id, user_id, key_id, provider, model, operation, stream, started_at, reservation, owner FROM in_flight;
DROP TABLE in_flight;
ALTER TABLE in_flight_new RENAME TO in_flight;

CREATE TABLE usage_events_new (
    external_id      TEXT PRIMARY KEY,
    request_id       TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    meter            TEXT NOT NULL,
    value            INTEGER NOT NULL,
    model            TEXT NOT NULL,
    provider         TEXT NOT NULL,
    ts               TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL DEFAULT '',
    claimed_by       TEXT,
    claimed_until    TEXT,
    last_error       TEXT,
    synced_at        TEXT
) WITHOUT ROWID;
INSERT INTO usage_events_new (external_id, request_id, user_id, meter, value, model, provider, ts, state, attempts,
                              next_attempt_at, claimed_by, claimed_until, last_error, synced_at)
    SELECT external_id, request_id, user_id, meter, value, model, provider, ts, state, attempts,
           next_attempt_at, claimed_by, claimed_until, last_error, synced_at FROM usage_events;
DROP TABLE usage_events;
ALTER TABLE usage_events_new RENAME TO usage_events;
CREATE INDEX ix_usage_events_user_meter_ts ON usage_events (user_id, meter, ts);
CREATE INDEX ix_usage_events_outbox ON usage_events (state, next_attempt_at) WHERE state IN ('pending', 'claimed');
