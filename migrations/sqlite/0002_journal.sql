-- Requests in flight now live in the journal (gateway/journal.py), which takes them in a write()
-- instead of a commit; the requests index had no reader. Both cost a B-tree write per request.
DROP TABLE in_flight;
DROP INDEX ix_requests_user_started;
