-- Several processes on one database: each takes slices ("leases") of a user's remaining balance
-- here and reserves requests from them in memory (gateway/billing/leases.py). A lease covers its
-- owner's reservations in flight, its finished requests not yet stored and an idle part. Available
-- for a new lease = credited - consumed in `requests` - every owner's leases.
CREATE TABLE processes (
    owner         text COLLATE "C" PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    journal       text NOT NULL DEFAULT '',  -- its journal directory ('' = none)
    started_at    timestamptz NOT NULL,
    heartbeat_at  timestamptz NOT NULL
);

CREATE TABLE quota_leases (
    owner     text COLLATE "C" NOT NULL,
    user_id   text COLLATE "C" NOT NULL,
    meter     text COLLATE "C" NOT NULL,
    amount    bigint NOT NULL,
    answered  bigint NOT NULL DEFAULT 0,  -- the last recall (invalidations.seq) this owner answered
    PRIMARY KEY (owner, user_id, meter)
);
CREATE INDEX ix_quota_leases_user ON quota_leases (user_id, meter);

-- What every process must hear within a second: limits changed (subject = user id), a key
-- revoked (key id), a balance recalled (user id). Each process polls for seq > its last seen.
CREATE TABLE invalidations (
    seq         bigserial PRIMARY KEY,
    kind        text NOT NULL,
    subject     text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE INDEX ix_invalidations_created ON invalidations (created_at);

-- A stored request's usage leaves its owner's lease in the same statement, so it is counted once:
-- in `requests` from now on. The transition table holds only the rows actually inserted, so a
-- replay (ON CONFLICT DO NOTHING of a request stored before) does not take it off twice.
CREATE FUNCTION requests_settle_leases() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE quota_leases AS l SET amount = l.amount - s.total
    FROM (
        SELECT n.owner, n.user_id, u.key AS meter, SUM(u.value::bigint) AS total
        FROM inserted AS n CROSS JOIN LATERAL jsonb_each_text(n.usage) AS u(key, value)
        WHERE u.value::bigint > 0
        GROUP BY n.owner, n.user_id, u.key
    ) AS s
    WHERE l.owner = s.owner AND l.user_id = s.user_id AND l.meter = s.meter;
    RETURN NULL;
END $$;

CREATE TRIGGER requests_settle_leases AFTER INSERT ON requests
REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION requests_settle_leases();
