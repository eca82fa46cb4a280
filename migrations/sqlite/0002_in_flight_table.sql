-- Requests in flight live in their own small table until they finish; a finished request is
-- written to `requests` once. Cheaper than inserting and then updating a `requests` row, and
-- crash recovery reads a table that holds only what is in flight.

CREATE TABLE in_flight (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    provider     TEXT NOT NULL,
    model        TEXT NOT NULL,
    operation    TEXT NOT NULL,
    stream       INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    reservation  TEXT NOT NULL,
    owner        TEXT NOT NULL
);

INSERT INTO in_flight (id, user_id, key_id, provider, model, operation, stream, started_at, reservation, owner)
    SELECT id, user_id, key_id, provider, model, operation, stream, started_at, reservation, owner
    FROM requests WHERE outcome = 'in_flight';
DELETE FROM requests WHERE outcome = 'in_flight';
DROP INDEX ix_requests_in_flight;

-- Events of a request are found by the external id prefix (`<request id>:`) on the primary key.
DROP INDEX ix_usage_events_request;
