-- Requests refused before forwarding (401 bad key, 402 quota, 429 rate limited, 503 unrecordable),
-- counted per hour (its start, ISO text), status and reason. Each process counts in memory and adds
-- its counts every few seconds, so rows only grow by addition: at most a few rows per hour.
CREATE TABLE refusals (
    hour   TEXT    NOT NULL,
    status INTEGER NOT NULL,
    reason TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (hour, status, reason)
) WITHOUT ROWID;
