"""What the shared rate limiters do in the background, and when their backend fails.

Corrections of buckets (token corrections, leases handed back) gather in a `Settler` and go to the
backend one batch at a time, never waiting on a request. A failing backend never fails a request:
the limiter admits (`on_store_error = "open"`) or refuses with Retry-After 1 ("closed"), and
`ErrorLog` says so at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.ratelimit.limiter import RateLimited, StoreErrorPolicy

log = logging.getLogger("gateway.ratelimit")

UNAVAILABLE = RateLimited("unavailable", 1)

Corrections = dict[tuple[str, int], list[int]]  # (user, second) -> [requests delta, tokens delta]


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
    """Gathers corrections of buckets and sends them in the background, one batch at a time."""

    def __init__(self, send: Callable[[Corrections], Awaitable[None]], errors: ErrorLog) -> None:
        self._send = send
        self._errors = errors
        self._pending: Corrections = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, user_id: str, second: int, requests: int, tokens: int) -> None:
        if not (requests or tokens):
            return
        delta = self._pending.get((user_id, second))
        if delta is None:
            self._pending[(user_id, second)] = [requests, tokens]
        else:
            delta[0] += requests
            delta[1] += tokens
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
                    await self._send({k: v for k, v in batch.items() if v[0] or v[1]})
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
