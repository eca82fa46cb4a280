-- Requests in flight now live in the journal (gateway/journal.py), which takes them in a write()
-- instead of a commit. `requests` is rebuilt WITHOUT ROWID (its id is time-ordered, so inserts
-- append to one B-tree instead of two) and loses an index nothing read.
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
