"""Rate-limit windows in SQLite (`RateBudget`), for several worker processes on one file.

A take (a lease of a user's budget, gateway/ratelimit/lease.py) is one `BEGIN IMMEDIATE`
transaction (read the user's buckets, size the slice, book it), so the processes take turns on the
file's write lock. It runs on a thread and connection of its own: one call per take instead of an
event-loop round trip per statement, and never queued behind the recorder's batch commits in this
process (other processes' commits still hold the lock). The clock is the machine's, which the
processes share.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.ratelimit.budget import Correction, Grant, NotApplied, Want, slice_of
from gateway.ratelimit.limiter import WINDOW, RateLimited

T = TypeVar("T")

_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=10000")
_CORRECT = "UPDATE rate_windows SET requests = requests + ?, tokens = tokens + ? WHERE user_id = ? AND second = ?"
_UPSERT = (
    "INSERT INTO rate_windows (user_id, second, requests, tokens) VALUES (?, ?, ?, ?) ON CONFLICT (user_id, second)"
    " DO UPDATE SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens"
)


class SqliteRateWindows:
    """Mixin for `SqliteStore` (uses its `path`; closes with it)."""

    path: str
    _rate_conn: sqlite3.Connection | None = None
    _rate_thread: ThreadPoolExecutor | None = None

    async def _rate_run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.path == ":memory:":
            raise RuntimeError("shared rate limits need a database file, not :memory:")
        if self._rate_thread is None:
            self._rate_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-ratelimit")
        job = asyncio.get_running_loop().run_in_executor(self._rate_thread, self._rate_call, fn, args)
        # A cancelled request does not cancel its admission half-way (the thread finishes it).
        return await asyncio.shield(job)

    def _rate_call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._rate_conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            for pragma in _PRAGMAS:
                conn.execute(pragma)
            self._rate_conn = conn
        return fn(self._rate_conn, *args)

    async def rate_take(
        self, user_id: str, want: Want, now: float | None, back: Correction | None
    ) -> Grant | RateLimited:
        return await self._rate_run(_take, user_id, want, now, back)

    async def rate_correct(self, corrections: Sequence[tuple[str, int, int, int]]) -> None:
        rows = [(requests, tokens, user_id, second) for user_id, second, requests, tokens in corrections]
        try:
            await self._rate_run(_correct, rows)
        except Exception as exc:  # one transaction, rolled back on any error (a COMMIT that failed included)
            raise NotApplied(str(exc)) from exc

    async def rate_sweep(self, now: float | None) -> int:
        return await self._rate_run(_sweep, now)

    async def close(self) -> None:
        if self._rate_thread is not None:
            if self._rate_conn is not None:
                conn, self._rate_conn = self._rate_conn, None
                await asyncio.get_running_loop().run_in_executor(self._rate_thread, conn.close)
            self._rate_thread.shutdown(wait=True)
            self._rate_thread = None
        await super().close()  # type: ignore[misc]


def _take(
    conn: sqlite3.Connection, user_id: str, want: Want, now: float | None, back: Correction | None
) -> Grant | RateLimited:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if back is not None:
            conn.execute(_CORRECT, (back[1], back[2], user_id, back[0]))
        t = time.time() if now is None else now  # under the lock: no take of a later second commits first
        buckets = conn.execute(
            "SELECT second, requests, tokens FROM rate_windows WHERE user_id = ? AND second > ? ORDER BY second",
            (user_id, int(t) - WINDOW),
        ).fetchall()
        got = slice_of(buckets, t, want)
        if isinstance(got, Grant):
            conn.execute(_UPSERT, (user_id, got.second, got.requests, got.tokens))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return got


def _correct(conn: sqlite3.Connection, rows: list[tuple[int, int, str, int]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_CORRECT, rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _sweep(conn: sqlite3.Connection, now: float | None) -> int:
    cutoff = int(time.time() if now is None else now) - WINDOW
    return conn.execute("DELETE FROM rate_windows WHERE second <= ?", (cutoff,)).rowcount
