"""Shared rate limiters on real backends, for their tests: Redis (a key prefix of the test's own),
SQLite (one file, a store per "process"), PostgreSQL (a database of the test's own).

`shared_backend(kind, tmp)` yields `make(rpm, tpm, clock=None, policy=OPEN)`: a new limiter (a new
process: connections of its own) on the one backend (PostgreSQL's also takes `pg_settings` for its
sessions, Redis's the `url` it reaches Redis by). `Counting` wraps a backend's `RateBudget` to count
its round trips and to fail on demand; `down(kind, tmp)` yields a budget of that kind whose backend
really fails (nothing listens, no table).
`lock_waiting` polls until a PostgreSQL session waits on a lock.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis

from gateway.ratelimit.budget import Correction, Grant, NotApplied, RateBudget, Want
from gateway.ratelimit.limiter import RateLimit, RateLimited, StoreErrorPolicy
from gateway.ratelimit.redis_backend import RedisBudget, RedisRateLimiter
from gateway.ratelimit.shared import StoreRateLimiter
from gateway.store.postgres_ratelimit import PostgresRateWindows
from gateway.store.schema import migration_scripts
from gateway.store.sqlite import SqliteStore
from tests.conftest import REDIS_URL, free_port

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
KINDS = ["redis", "sqlite", "postgres"]


class Clock:
    """The limiters' test hook: stands for the backend's clock and the process's monotonic clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class PgHost(PostgresRateWindows):
    """The PostgreSQL store as far as rate windows go: its pool."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool


class Counting:
    """A `RateBudget` that counts the round trips to the one it wraps, and fails while `failing` (a
    batch of corrections as one that never reached it), or after applying a batch while `lost`."""

    def __init__(self, inner: RateBudget) -> None:
        self.inner = inner
        self.takes = 0
        self.corrections = 0  # batches
        self.sweeps = 0
        self.failing = False
        self.lost = False  # the answer to a batch it applied is lost (a connection dropped, a timeout)
        self.hang: asyncio.Event | None = None  # takes do not answer until it is set

    async def rate_take(
        self, user_id: str, want: Want, now: float | None, back: Correction | None
    ) -> Grant | RateLimited:
        self.takes += 1
        if self.hang is not None:
            await self.hang.wait()
        if self.failing:
            raise ConnectionError("the backend is down")
        return await self.inner.rate_take(user_id, want, now, back)

    async def rate_correct(self, corrections: Sequence[tuple[str, int, int, int]]) -> None:
        self.corrections += 1
        if self.failing:
            raise NotApplied("the backend is down") from ConnectionError("the backend is down")
        await self.inner.rate_correct(corrections)
        if self.lost:
            raise ConnectionError("the connection dropped before the answer")

    async def rate_sweep(self, now: float | None) -> int:
        self.sweeps += 1
        return await self.inner.rate_sweep(now)


Make = Callable[..., Awaitable[Any]]  # (rpm, tpm, clock=None, policy=OPEN) -> a limiter on the shared backend


@asynccontextmanager
async def shared_backend(kind: str, tmp: Path) -> AsyncIterator[Make]:
    if kind == "redis":
        async with _redis() as make:
            yield make
    elif kind == "sqlite":
        async with _sqlite(tmp) as make:
            yield make
    else:
        async with _postgres() as make:
            yield make


@asynccontextmanager
async def _redis() -> AsyncIterator[Make]:
    prefix = f"test:rl:{secrets.token_hex(6)}:"
    made: list[RedisRateLimiter] = []

    async def make(
        rpm: int | None,
        tpm: int | None,
        clock: Clock | None = None,
        policy: StoreErrorPolicy = StoreErrorPolicy.OPEN,
        url: str = REDIS_URL,  # the one Redis, maybe by another way (a relay, a client name)
    ) -> RedisRateLimiter:
        rl = RedisRateLimiter(url, rpm, tpm, on_store_error=policy, key_prefix=prefix, clock=clock)
        made.append(rl)
        return rl

    try:
        yield make
    finally:
        for rl in made:
            await rl.close()
        await drop_redis_keys(REDIS_URL, prefix)


async def drop_redis_keys(url: str, prefix: str) -> None:
    """Delete what limiters under `prefix` left in Redis (tests and bench/ratelimit.py)."""
    r = Redis.from_url(url)
    keys = [k async for k in r.scan_iter(match=prefix + "*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


@asynccontextmanager
async def _sqlite(tmp: Path) -> AsyncIterator[Make]:
    db = str(tmp / "shared.db")
    stores: list[SqliteStore] = []
    made: list[StoreRateLimiter] = []

    async def make(
        rpm: int | None, tpm: int | None, clock: Clock | None = None, policy: StoreErrorPolicy = StoreErrorPolicy.OPEN
    ) -> StoreRateLimiter:
        store = SqliteStore(db)  # a process of its own: own connections
        await store.open()
        await store.migrate()
        stores.append(store)
        made.append(StoreRateLimiter(store, rpm, tpm, policy, clock))
        return made[-1]

    try:
        yield make
    finally:
        for rl in made:
            await rl.close()
        for store in stores:
            await store.close()


@asynccontextmanager
async def _postgres() -> AsyncIterator[Make]:
    name = f"gw_rl_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f"CREATE DATABASE {name}")
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    pools: list[Any] = []
    made: list[StoreRateLimiter] = []
    try:
        conn = await asyncpg.connect(url)
        await conn.execute(dict(migration_scripts("postgres"))["0002_rate_windows"])
        await conn.close()

        async def make(
            rpm: int | None,
            tpm: int | None,
            clock: Clock | None = None,
            policy: StoreErrorPolicy = StoreErrorPolicy.OPEN,
            pg_settings: dict[str, str] | None = None,  # its sessions' settings (application_name, deadlock_timeout)
        ) -> StoreRateLimiter:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=10, server_settings=pg_settings)
            pools.append(pool)
            made.append(StoreRateLimiter(PgHost(pool), rpm, tpm, policy, clock))
            return made[-1]

        yield make
    finally:
        for rl in made:
            await rl.close()
        for pool in pools:
            await pool.close()
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


@asynccontextmanager
async def down(kind: str, tmp: Path) -> AsyncIterator[RateBudget]:
    """A budget of `kind` whose backend fails for real: nothing listens (Redis, PostgreSQL), or the
    database file has no rate windows (SQLite)."""
    if kind == "redis":
        redis = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1.0)
        try:
            yield RedisBudget(redis, "test:rl:down:", 120)
        finally:
            await redis.aclose()
    elif kind == "sqlite":
        store = SqliteStore(str(tmp / "unmigrated.db"))
        await store.open()
        try:
            yield store
        finally:
            await store.close()
    else:
        pool = await asyncpg.create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/test", min_size=0)
        try:
            yield PgHost(pool)
        finally:
            await pool.close()


async def admitted(rl: RateLimit, user: str = "u", tokens: int = 0) -> bool:
    refusal, _ = await rl.acquire(user, tokens)
    return refusal is None


def lock_waiting(pool: Any, application_name: str, task: asyncio.Task[Any]) -> Callable[[], Awaitable[bool]]:
    """For `wait_until_async`: the sessions named `application_name` wait on a lock, or `task` ended."""

    async def check() -> bool:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
        return task.done() or await pool.fetchval(sql, application_name) > 0

    return check
