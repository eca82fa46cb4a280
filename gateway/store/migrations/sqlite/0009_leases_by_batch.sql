-- A stored request still leaves its owner's lease in the transaction that stores it, but the
-- store does it once per batch (one UPDATE per owner, user and meter, summed over the rows the
-- INSERT returned: rows actually inserted, so a replay is not taken off twice) instead of this
-- trigger once per row, which parsed the row's usage three times and updated a lease row per meter.
DROP TRIGGER requests_settle_leases;
