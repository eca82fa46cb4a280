"""What the shared rate limiters do in the background, and when their backend fails.

Corrections of buckets (token corrections, leases handed back) gather in a `Settler` and go to the
backend one batch at a time, never waiting on a request. A batch the backend certainly did not apply
(`NotApplied`: down, or rolled back) goes back into the pending corrections and is sent again after
a backoff, until it is applied or its seconds have left the window (then it changes no decision). A
failing backend never fails a request: the limiter admits (`on_store_error = "open"`) or refuses
with Retry-After 1 ("closed"), and `ErrorLog` says so at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable

from gateway.ratelimit.budget import NotApplied
from gateway.ratelimit.limiter import WINDOW, RateLimited, StoreErrorPolicy

log = logging.getLogger("gateway.ratelimit")

UNAVAILABLE = RateLimited("unavailable", 1)

Corrections = dict[tuple[str, int], list[int]]  # (user, second) -> [requests delta, tokens delta]

RETRY_FIRST = 0.05  # seconds after a failed batch before the next; doubling up to RETRY_MAX
RETRY_MAX = 1.0


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
        if isinstance(exc, NotApplied) and exc.__cause__ is not None:
            exc = exc.__cause__  # (what the backend said)
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
    """Gathers corrections of buckets and sends them in the background, one batch at a time.

    Pending corrections are at most one per user and second of the window: those of seconds out of
    it are dropped when a batch fails, so a long outage cannot grow them without limit.
    """

    def __init__(
        self,
        send: Callable[[Corrections], Awaitable[None]],
        errors: ErrorLog,
        now: Callable[[], float],  # the backend's clock (as well as known): which seconds left the window
    ) -> None:
        self._send = send
        self._errors = errors
        self._now = now
        self._pending: Corrections = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._stop = asyncio.Event()  # wakes a backoff at close

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
        if self._task is None and not self._closed:
            # (a context of its own: what it logs belongs to no one request's id)
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="ratelimit-settle", context=contextvars.Context()
            )

    async def _run(self) -> None:
        backoff = 0.0
        try:
            while True:
                batch, self._pending = self._pending, {}
                try:
                    await self._send({k: v for k, v in batch.items() if v[0] or v[1]})
                    backoff = 0.0
                except Exception as exc:
                    self._errors.failed(exc)
                    # Only a batch the backend certainly did not apply goes back. Any other failure may
                    # come after it applied the batch (its answer lost: a dropped connection, a timeout
                    # on commit), which cannot be told apart: the batch is dropped, never sent twice.
                    # Either way one batch's deltas skew the window until they leave it, but a lost
                    # hand-back (most corrections: unused slices, estimates above the actual) errs toward
                    # refusing, as a take's hand-back that failed does, where one applied twice would let
                    # the user past the limit.
                    unsent = batch if isinstance(exc, NotApplied) else {}
                    if self._closed:
                        self._lost(unsent)
                        return
                    self._keep(unsent)
                    backoff = min(RETRY_MAX, 2 * backoff) if backoff else RETRY_FIRST
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), backoff)  # (not a busy loop while it is down)
                    self._drop_expired()
                if not self._pending or self._closed:
                    return
        finally:
            self._task = None

    def _keep(self, batch: Corrections) -> None:
        """Put a batch that was not applied back, adding it to what came meanwhile for the same buckets."""
        for key, delta in batch.items():
            if not (delta[0] or delta[1]):
                continue
            newer = self._pending.get(key)
            if newer is None:
                self._pending[key] = delta
            else:
                newer[0] += delta[0]
                newer[1] += delta[1]

    def _drop_expired(self) -> None:
        """Forget corrections of seconds out of the window: those buckets decide nothing any more."""
        gone = math.floor(self._now()) - WINDOW
        for key in [k for k in self._pending if k[1] <= gone]:
            del self._pending[key]

    async def flush(self, seconds: float) -> None:
        """Wait until every correction added so far is sent (or dropped), for `seconds` at most."""
        if self._task is not None:
            await asyncio.wait((self._task,), timeout=seconds)

    async def close(self, seconds: float) -> None:
        """Flush for `seconds` at most, then stop: what the backend has not taken by then is lost (logged)."""
        await self.flush(seconds)
        self._closed = True  # (a batch still under way ends on its own, as the store closes, and is not retried)
        self._stop.set()
        self._lost(self._pending)
        self._pending = {}

    def _lost(self, corrections: Corrections) -> None:
        if lost := sum(1 for v in corrections.values() if v[0] or v[1]):
            log.warning("rate limits: %d correction(s) not sent at shutdown (the backend failed)", lost)
