-- Rate-limit windows shared by the replicas: per user, one row per second with requests admitted
-- and tokens counted in it. Rows leave 60 s after their second. UNLOGGED: a window lost in a crash
-- of the database costs at most one minute of limits, and it saves the WAL write per request.
CREATE UNLOGGED TABLE rate_windows (
    user_id  TEXT   NOT NULL,
    second   BIGINT NOT NULL,
    requests INTEGER NOT NULL,
    tokens   BIGINT NOT NULL,
    PRIMARY KEY (user_id, second)
);

CREATE INDEX rate_windows_second ON rate_windows (second);
