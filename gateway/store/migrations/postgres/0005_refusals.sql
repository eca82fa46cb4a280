-- Requests refused before forwarding (401 bad key, 402 quota, 429 rate limited, 503 unrecordable),
-- counted per hour (its start), status and reason. Each process counts in memory and adds its counts
-- every few seconds, so replicas never conflict on more than an addition: at most a few rows per hour.
CREATE TABLE refusals (
    hour   TIMESTAMPTZ NOT NULL,
    status INTEGER     NOT NULL,
    reason TEXT        NOT NULL,
    count  BIGINT      NOT NULL,
    PRIMARY KEY (hour, status, reason)
);
