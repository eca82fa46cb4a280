"""Rate-limit windows in PostgreSQL (`RateBudget`), for replicas sharing one database.

A take (a lease of a user's budget, gateway/ratelimit/lease.py) is one transaction holding a
transaction-scoped advisory lock on the user (other users are not blocked): lock and read the
database's clock, hand back the rest of the process's last lease, read the user's buckets, book
the slice. The buckets are read in a statement
after the lock's, so they include every take committed before it (READ COMMITTED takes a snapshot
per statement).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.ratelimit.budget import Correction, Grant, NotApplied, Want, slice_of
from gateway.ratelimit.limiter import WINDOW, RateLimited

_LOCK_SPACE = 0x524C  # advisory-lock namespace of the rate limiter (first key of the pair)
_LOCK_AND_NOW = (
    "SELECT coalesce($2::float8, extract(epoch FROM clock_timestamp())::float8)"
    f" FROM (SELECT pg_advisory_xact_lock({_LOCK_SPACE}, hashtext($1))) AS locked"
)
_BUCKETS = "SELECT second, requests, tokens FROM rate_windows WHERE user_id = $1 AND second > $2 ORDER BY second"
_UPSERT = (
    "INSERT INTO rate_windows (user_id, second, requests, tokens) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (user_id, second) DO UPDATE"
    " SET requests = rate_windows.requests + excluded.requests, tokens = rate_windows.tokens + excluded.tokens"
)
_CORRECT = "UPDATE rate_windows SET requests = requests + $1, tokens = tokens + $2 WHERE user_id = $3 AND second = $4"
# Skips the rows another transaction holds (a correction batch, a take's hand-back; the next sweep
# deletes them): a sweep that waited for them, locking in the table's order, deadlocked with a batch
# correcting the same expired rows in its (second, user) order, and PostgreSQL aborted one of the two.
_SWEEP = (
    "DELETE FROM rate_windows WHERE ctid = ANY(ARRAY(SELECT ctid FROM rate_windows WHERE second <="
    f" floor(coalesce($1::float8, extract(epoch FROM clock_timestamp())))::bigint - {WINDOW}"
    " FOR UPDATE SKIP LOCKED))"
)


class PostgresRateWindows:
    """Mixin for the PostgreSQL store (uses its asyncpg pool `self.pool`)."""

    pool: Any  # asyncpg.Pool

    async def rate_take(
        self, user_id: str, want: Want, now: float | None, back: Correction | None
    ) -> Grant | RateLimited:
        async with self.pool.acquire() as conn, conn.transaction():
            t = float(await conn.fetchval(_LOCK_AND_NOW, user_id, now))
            if back is not None:
                await conn.execute(_CORRECT, back[1], back[2], user_id, back[0])
            rows = await conn.fetch(_BUCKETS, user_id, int(t) - WINDOW)
            got = slice_of([(r[0], r[1], r[2]) for r in rows], t, want)
            if isinstance(got, Grant):
                await conn.execute(_UPSERT, user_id, got.second, got.requests, got.tokens)
        return got

    async def rate_correct(self, corrections: Sequence[tuple[str, int, int, int]]) -> None:
        # One transaction (executemany is atomic): rows locked in one order, by second then user, as a
        # take locks them (its hand-back's second, then the current one), so no two processes deadlock.
        rows = [(r, t, user, second) for user, second, r, t in sorted(corrections, key=lambda c: (c[1], c[0]))]
        try:
            conn = await self.pool.acquire()
        except Exception as exc:  # (the database down: nothing sent)
            raise NotApplied(str(exc)) from exc
        try:
            await conn.executemany(_CORRECT, rows)
        except asyncpg.PostgresError as exc:
            # An error the server answered rolled the batch back (a deadlock, a missing table); not one
            # that ends the session (class 08, 57P: shutting down), which may come after a commit.
            if exc.sqlstate is not None and not exc.sqlstate.startswith(("08", "57P")):
                raise NotApplied(str(exc)) from exc
            raise
        finally:
            await self.pool.release(conn)

    async def rate_sweep(self, now: float | None) -> int:
        async with self.pool.acquire() as conn:
            status = await conn.execute(_SWEEP, now)
        return int(status.split()[-1])
