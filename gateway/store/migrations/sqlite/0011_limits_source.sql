-- Where a cached snapshot came from: 'webhook' (stamped with Polar's payload time) or 'fetch' (a refresh,
-- stamped with this machine's clock). A webhook older than a fetch is only stale on one clock: it makes the
-- gateway fetch again instead of being dropped. Rows from before this are taken for fetches (at worst, one
-- extra fetch).
ALTER TABLE customer_limits ADD COLUMN source TEXT NOT NULL DEFAULT 'fetch';
