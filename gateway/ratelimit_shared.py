"""Rate limits shared by several processes: the store-backed limiter, and what it shares with Redis's.

The store-backed limiter admits in one transaction per request that excludes every other admitter
of the same user (SQLite: BEGIN IMMEDIATE on the shared file; PostgreSQL: an advisory lock per
user), so N processes count like one. Token corrections (`settle`) never wait on the request: they
gather and go to the store in the background, one batch per event-loop turn.

A failing store never fails a request: the limiter admits (`on_store_error = "open"`) or refuses
with Retry-After 1 ("closed"), and says so in the log at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gateway.ratelimit import (
    WINDOW,
    Bucket,
    RateLimit,
    RateLimited,
    RateLimiter,
    StoreErrorPolicy,
    check,
)
from gateway.store.base import RateWindowStore

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger("gateway.ratelimit")

SWEEP_EVERY = 10_000  # admissions between deletions of every user's expired buckets
UNAVAILABLE = RateLimited("unavailable", 1)

Corrections = dict[tuple[str, int], int]  # (user, second) -> token delta


class ErrorLog:
    """Logs a failing store at most once per `every` seconds (with the count), and its recovery."""

    def __init__(self, what: str, every: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what
        self.every = every
        self._clock = clock
        self._failures = 0  # since the last line
        self._last: float | None = None
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        self._failures += 1
        self.failing = True
        now = self._clock()
        if self._last is None or now - self._last >= self.every:
            log.error(
                "%s failed %d time(s) since the last report; latest: %s: %s",
                self.what,
                self._failures,
                type(exc).__name__,
                exc,
            )
            self._last, self._failures = now, 0

    def recovered(self) -> None:
        self.failing, self._last, self._failures = False, None, 0
        log.warning("%s works again", self.what)


def on_store_error(policy: StoreErrorPolicy) -> tuple[RateLimited | None, None]:
    """What a limiter answers when its store failed: admit (open) or refuse for a second (closed)."""
    return (None, None) if policy is StoreErrorPolicy.OPEN else (UNAVAILABLE, None)


class Settler:
    """Gathers token corrections and sends them in the background, one batch at a time."""

    def __init__(self, send: Callable[[Corrections], Awaitable[None]], errors: ErrorLog) -> None:
        self._send = send
        self._errors = errors
        self._pending: Corrections = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, user_id: str, second: int, delta: int) -> None:
        if delta == 0:
            return
        key = (user_id, second)
        self._pending[key] = self._pending.get(key, 0) + delta
        self.kick()

    def kick(self) -> None:
        """Run the sender unless it runs already (also with nothing to correct: it has other background work)."""
        if self._task is None:
            # (a context of its own: what it logs belongs to no one request's id)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="ratelimit-settle", context=contextvars.Context()
            )

    async def _run(self) -> None:
        try:
            while True:
                batch, self._pending = self._pending, {}
                try:
                    await self._send({k: v for k, v in batch.items() if v})
                except Exception as exc:  # logged; a lost correction only skews one window
                    self._errors.failed(exc)
                if not self._pending:
                    return
        finally:
            self._task = None

    async def flush(self) -> None:
        """Wait until every correction added so far is sent (or failed)."""
        if self._task is not None:
            await asyncio.shield(self._task)


class StoreRateLimiter:
    """`RateLimit` over a `RateWindowStore`: exact across processes sharing the database."""

    def __init__(
        self,
        store: RateWindowStore,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        on_store_error: StoreErrorPolicy = StoreErrorPolicy.OPEN,
        clock: Callable[[], float] | None = None,  # None: the database's clock (tests inject one)
    ) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._store = store
        self._policy = on_store_error
        self._clock = clock
        self._errors = ErrorLog("rate-limit store")
        self._settler = Settler(self._send, self._errors)
        self._admitted = 0
        self._sweep_due = False

    async def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        if self.rpm is None and self.tpm is None:
            return None, None
        rpm, tpm = self.rpm, self.tpm

        def decide(buckets: list[Bucket], now: float) -> RateLimited | None:
            return check(buckets, now, rpm, tpm, tokens)

        try:
            refusal, second = await self._store.rate_admit(
                user_id, tokens, decide, None if self._clock is None else self._clock()
            )
        except Exception as exc:
            self._errors.failed(exc)
            return on_store_error(self._policy)
        if self._errors.failing:
            self._errors.recovered()
        if refusal is not None:
            return refusal, None
        self._admitted += 1
        if self._admitted % SWEEP_EVERY == 0:
            self._sweep_due = True
            self._settler.kick()
        return None, (second, tokens)

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        if isinstance(ticket, tuple):
            second, reserved = ticket
            self._settler.add(user_id, second, actual_tokens - reserved)

    async def _send(self, batch: Corrections) -> None:
        if batch:
            await self._store.rate_correct([(user, second, delta) for (user, second), delta in batch.items()])
        if self._sweep_due:
            self._sweep_due = False
            await self._store.rate_sweep(None if self._clock is None else self._clock())

    async def flush(self) -> None:
        """Wait until the corrections settled so far reached the store."""
        await self._settler.flush()

    async def close(self) -> None:
        await self._settler.flush()


def make_limiter(settings: Settings, store: RateWindowStore, *, shared: bool) -> RateLimit:
    """Redis when GATEWAY_REDIS_URL is set; else the database when several processes share it
    (`shared`: more than one worker, or PostgreSQL); else in memory."""
    rl = settings.file.rate_limit
    if rl.requests_per_minute is None and rl.tokens_per_minute is None:
        return RateLimiter(None, None)
    if settings.redis_url:
        from gateway.ratelimit_redis import RedisRateLimiter

        return RedisRateLimiter(
            settings.redis_url, rl.requests_per_minute, rl.tokens_per_minute, on_store_error=rl.on_store_error
        )
    if shared:
        return StoreRateLimiter(store, rl.requests_per_minute, rl.tokens_per_minute, rl.on_store_error)
    return RateLimiter(rl.requests_per_minute, rl.tokens_per_minute)


__all__ = ["WINDOW", "ErrorLog", "RateWindowStore", "Settler", "StoreRateLimiter", "make_limiter"]
