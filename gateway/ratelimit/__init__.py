"""Per-user rate limits (requests and tokens per minute), in one process or shared by several.

`limiter`: the sliding window and the in-process limiter. `budget`: what a shared backend does
(grant a slice of a user's per-minute budget). `lease`: the limiter that spends such slices
locally; `settler`: its background work and failure policy. `redis_backend`: the budget in Redis;
`shared`: which limiter a gateway runs, and the database-backed budget.
"""
