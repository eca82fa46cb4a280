-- The sync backlog for /healthz (polled often): counts by state and the oldest unsynced request
-- come from this index alone. Only unsynced rows are in it, so it stays as small as the backlog.
CREATE INDEX ix_requests_backlog ON requests (sync_state, started_at) WHERE sync_state IN ('pending', 'claimed', 'failed');
