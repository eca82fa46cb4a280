"""Rate-limit windows in SQLite (`RateWindowStore`), for several worker processes on one file.

An admission is one `BEGIN IMMEDIATE` transaction (read the user's buckets, decide, count), so
the processes take turns on the file's write lock. It runs on a thread and connection of its own:
one call per admission instead of an event-loop round trip per statement, and never queued behind
the recorder's batch commits in this process (other processes' commits still hold the lock).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.ratelimit import WINDOW, RateLimited
from gateway.store.base import Decide

T = TypeVar("T")

_PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=10000")
_UPSERT = (
    "INSERT INTO rate_windows (user_id, second, requests, tokens) VALUES (?, ?, 1, ?)"
    " ON CONFLICT (user_id, second) DO UPDATE SET requests = requests + 1, tokens = tokens + excluded.tokens"
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

    async def rate_admit(
        self, user_id: str, tokens: int, decide: Decide, now: float | None
    ) -> tuple[RateLimited | None, int]:
        return await self._rate_run(_admit, user_id, tokens, decide, now)

    async def rate_correct(self, corrections: Sequence[tuple[str, int, int]]) -> None:
        rows = [(delta, user_id, second) for user_id, second, delta in corrections]
        await self._rate_run(_correct, rows)

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


def _admit(
    conn: sqlite3.Connection, user_id: str, tokens: int, decide: Decide, now: float | None
) -> tuple[RateLimited | None, int]:
    t = time.time() if now is None else now  # the processes share the machine's clock
    second = int(t)
    conn.execute("BEGIN IMMEDIATE")
    try:
        buckets = conn.execute(
            "SELECT second, requests, tokens FROM rate_windows WHERE user_id = ? AND second > ? ORDER BY second",
            (user_id, second - WINDOW),
        ).fetchall()
        refusal = decide(buckets, t)
        if refusal is None:
            conn.execute(_UPSERT, (user_id, second, tokens))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return refusal, second


def _correct(conn: sqlite3.Connection, rows: list[tuple[int, str, int]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany("UPDATE rate_windows SET tokens = tokens + ? WHERE user_id = ? AND second = ?", rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _sweep(conn: sqlite3.Connection, now: float | None) -> int:
    cutoff = int(time.time() if now is None else now) - WINDOW
    return conn.execute("DELETE FROM rate_windows WHERE second <= ?", (cutoff,)).rowcount
