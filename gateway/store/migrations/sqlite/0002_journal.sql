-- Requests in flight now live in the journal (gateway/journal.py), which takes them in a write()
-- instead of a commit. `requests` is rebuilt WITHOUT ROWID (its id is time-ordered, so inserts
-- append to one B-tree instead of two) and loses an index nothing read.
-- What a killed process left in flight was settled at the next start of the version that wrote it (billed
-- by estimate: its reservation, cache meters excluded, as `estimate_from_reservation`); an upgrade is
-- that start, so settle it here (its events pending for Polar) rather than drop it unbilled.
INSERT INTO requests (id, user_id, key_id, provider, model, operation, stream, started_at, finished_at, outcome,
    reservation, usage, estimated, owner)
SELECT f.id, f.user_id, f.key_id, f.provider, f.model, f.operation, f.stream, f.started_at,
    strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z', 'crashed', f.reservation,
    (SELECT json_group_object(u.key, u.value) FROM json_each(f.reservation) AS u
        WHERE u.value > 0 AND u.key NOT IN ('claude_cache_write_tokens', 'claude_cache_read_tokens', 'gemini_cached_tokens')),
    1, f.owner
FROM in_flight AS f WHERE f.id NOT IN (SELECT id FROM requests);
INSERT OR IGNORE INTO usage_events (external_id, request_id, user_id, meter, value, model, provider, ts)
SELECT r.id || ':' || u.key, r.id, r.user_id, u.key, u.value, r.model, r.provider, r.started_at
FROM in_flight AS f JOIN requests AS r ON r.id = f.id, json_each(r.usage) AS u
WHERE r.outcome = 'crashed' AND r.estimated = 1 AND u.value > 0;
DROP TABLE in_flight;

CREATE TABLE requests_new (
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
) WITHOUT ROWID;
INSERT INTO requests_new SELECT id, user_id, key_id, provider, model, operation, stream, started_at, finished_at,
    status_code, outcome, reservation, usage, usage_raw, estimated, owner FROM requests;
DROP TABLE requests;
ALTER TABLE requests_new RENAME TO requests;
