-- The Polar outbox moves from one `usage_events` row per event to the `requests` row itself.
-- A request's events are a pure function of its `usage` (gateway/events.py: one per non-zero
-- meter, one per image, external ids derived from the request id), so storing them again cost
-- 1 + 2 index B-tree inserts per event for nothing; a request now costs one row and two index
-- entries. Sync state is per request: Polar dedups by external id, so resending a request whose
-- events were partly accepted is harmless.
ALTER TABLE requests ADD COLUMN sync_state TEXT NOT NULL DEFAULT 'none';  -- none | pending | claimed | synced | failed
ALTER TABLE requests ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN next_attempt_at TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN claimed_by TEXT;
ALTER TABLE requests ADD COLUMN claimed_until TEXT;
ALTER TABLE requests ADD COLUMN last_error TEXT;
ALTER TABLE requests ADD COLUMN synced_at TEXT;

-- Carry each request's events' state over: any failed -> failed, else any not synced -> pending
-- (claims are handed back), else synced.
UPDATE requests SET
    sync_state = CASE
        WHEN e.failed > 0 THEN 'failed'
        WHEN e.unsynced > 0 THEN 'pending'
        ELSE 'synced' END,
    attempts = e.attempts,
    next_attempt_at = e.next_attempt_at,
    last_error = e.last_error,
    synced_at = CASE WHEN e.failed = 0 AND e.unsynced = 0 THEN e.synced_at END
FROM (
    SELECT request_id,
        SUM(state = 'failed') AS failed,
        SUM(state IN ('pending', 'claimed')) AS unsynced,
        MAX(attempts) AS attempts,
        COALESCE(MIN(CASE WHEN state = 'pending' THEN next_attempt_at END), '') AS next_attempt_at,
        MAX(last_error) AS last_error,
        MAX(synced_at) AS synced_at
    FROM usage_events GROUP BY request_id
) AS e
WHERE requests.id = e.request_id;

DROP TABLE usage_events;
CREATE INDEX ix_requests_outbox ON requests (sync_state, next_attempt_at) WHERE sync_state IN ('pending', 'claimed');
