-- ix_requests_outbox served no query: SQLite does not take `sync_state = 'pending'` to imply the
-- index's `sync_state IN ('pending', 'claimed')`, so the claim's OR of two states scans the table
-- (EXPLAIN QUERY PLAN), and every other outbox statement reads ix_requests_backlog or the table.
-- Every finished request with events still paid an entry in it.
DROP INDEX ix_requests_outbox;
