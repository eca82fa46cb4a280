-- Several processes on one database: each takes slices ("leases") of a user's remaining balance
-- here and reserves requests from them in memory (gateway/billing/leases.py). A lease covers its
-- owner's reservations in flight, its finished requests not yet stored and an idle part. Available
-- for a new lease = credited - consumed in `requests` - every owner's leases.
CREATE TABLE processes (
    owner         TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    journal       TEXT NOT NULL DEFAULT '',  -- its journal directory ('' = none)
    started_at    TEXT NOT NULL,
    heartbeat_at  TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE quota_leases (
    owner     TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    meter     TEXT NOT NULL,
    amount    INTEGER NOT NULL,
    answered  INTEGER NOT NULL DEFAULT 0,  -- the last recall (invalidations.seq) this owner answered
    PRIMARY KEY (owner, user_id, meter)
) WITHOUT ROWID;
CREATE INDEX ix_quota_leases_user ON quota_leases (user_id, meter);

-- What every process must hear within a second: limits changed (subject = user id), a key
-- revoked (key id), a balance recalled (user id). Each process polls for seq > its last seen.
CREATE TABLE invalidations (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX ix_invalidations_created ON invalidations (created_at);

-- A stored request's usage leaves its owner's lease in the same transaction, so it is counted
-- once: in `requests` from now on. A trigger fires only for rows actually inserted, so a replay
-- (journal recovery of a request stored before) does not take it off twice. Without leases
-- (one process) the WHEN clause is one index probe per row.
CREATE TRIGGER requests_settle_leases AFTER INSERT ON requests
WHEN EXISTS (SELECT 1 FROM quota_leases WHERE owner = NEW.owner AND user_id = NEW.user_id)
BEGIN
    UPDATE quota_leases SET amount = amount - (SELECT u.value FROM json_each(NEW.usage) AS u WHERE u.key = quota_leases.meter)
    WHERE owner = NEW.owner AND user_id = NEW.user_id
        AND meter IN (SELECT u.key FROM json_each(NEW.usage) AS u WHERE u.value > 0);
END;
