-- Rate-limit windows shared by the processes on one database file: per user, one row per second
-- with requests admitted and tokens counted in it. Rows leave 60 s after their second.
CREATE TABLE rate_windows (
    user_id  TEXT    NOT NULL,
    second   INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    tokens   INTEGER NOT NULL,
    PRIMARY KEY (user_id, second)
) WITHOUT ROWID;

CREATE INDEX rate_windows_second ON rate_windows (second);
