"""Rate-limit windows in PostgreSQL (`RateWindowStore`), for replicas sharing one database.

An admission is one transaction holding a transaction-scoped advisory lock on the user (other
users are not blocked): lock and read the database's clock, read the user's buckets, count. The
buckets are read in a statement after the lock's, so they include every admission committed
before it (READ COMMITTED takes a snapshot per statement).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.ratelimit import WINDOW, RateLimited
from gateway.store.base import Decide

_LOCK_SPACE = 0x524C  # advisory-lock namespace of the rate limiter (first key of the pair)
_LOCK_AND_NOW = (
    "SELECT coalesce($2::float8, extract(epoch FROM clock_timestamp())::float8)"
    f" FROM (SELECT pg_advisory_xact_lock({_LOCK_SPACE}, hashtext($1))) AS locked"
)
_BUCKETS = "SELECT second, requests, tokens FROM rate_windows WHERE user_id = $1 AND second > $2 ORDER BY second"
_UPSERT = (
    "INSERT INTO rate_windows (user_id, second, requests, tokens) VALUES ($1, $2, 1, $3)"
    " ON CONFLICT (user_id, second) DO UPDATE"
    " SET requests = rate_windows.requests + 1, tokens = rate_windows.tokens + excluded.tokens"
)

_SWEEP = (
    "DELETE FROM rate_windows WHERE second <="
    f" floor(coalesce($1::float8, extract(epoch FROM clock_timestamp())))::bigint - {WINDOW}"
)


class PostgresRateWindows:
    """Mixin for the PostgreSQL store (uses its asyncpg pool `self.pool`)."""

    pool: Any  # asyncpg.Pool

    async def rate_admit(
        self, user_id: str, tokens: int, decide: Decide, now: float | None
    ) -> tuple[RateLimited | None, int]:
        async with self.pool.acquire() as conn, conn.transaction():
            t = float(await conn.fetchval(_LOCK_AND_NOW, user_id, now))
            second = int(t)
            rows = await conn.fetch(_BUCKETS, user_id, second - WINDOW)
            refusal = decide([(r[0], r[1], r[2]) for r in rows], t)
            if refusal is None:
                await conn.execute(_UPSERT, user_id, second, tokens)
        return refusal, second

    async def rate_correct(self, corrections: Sequence[tuple[str, int, int]]) -> None:
        rows = [(delta, user_id, second) for user_id, second, delta in corrections]
        async with self.pool.acquire() as conn:
            await conn.executemany(
                "UPDATE rate_windows SET tokens = tokens + $1 WHERE user_id = $2 AND second = $3", rows
            )

    async def rate_sweep(self, now: float | None) -> int:
        async with self.pool.acquire() as conn:
            status = await conn.execute(_SWEEP, now)
        return int(status.split()[-1])
