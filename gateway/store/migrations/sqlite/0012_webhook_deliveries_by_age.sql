-- Deliveries older than the retention are deleted in small batches, oldest first: without this
-- index each batch would scan the whole table.
CREATE INDEX ix_webhook_deliveries_processed ON webhook_deliveries (processed_at);
