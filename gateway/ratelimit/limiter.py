"""Per-user rate limits: requests and tokens per minute over a sliding 60 s window of 1 s buckets.

Tokens are counted as reserved at pre-check (estimate) and corrected to the actual usage
when the request ends, so parallel requests cannot all pass on the same window.

Buckets, not an entry per request: at thousands of requests per second an entry each kept
hundreds of thousands of objects alive per user, which the garbage collector rescanned (measured:
p99 from 10 ms to 60 ms after a minute of load). A bucket leaves the window 59 to 60 s after its
requests were admitted.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

WINDOW = 60  # seconds, in 1 s buckets
SWEEP_EVERY = 10_000  # admissions between sweeps of idle users' windows


@dataclass(slots=True)
class _Window:
    buckets: deque[list[int]] = field(default_factory=deque)  # [second, requests, tokens], oldest first
    requests: int = 0
    tokens: int = 0

    def expire(self, second: int) -> None:
        buckets = self.buckets
        while buckets and buckets[0][0] <= second - WINDOW:
            bucket = buckets.popleft()
            self.requests -= bucket[1]
            self.tokens -= bucket[2]
            bucket.clear()  # out of the window: a ticket on it has nothing left to correct

    def admit(self, second: int, tokens: int) -> list[int]:
        buckets = self.buckets
        if buckets and (bucket := buckets[-1])[0] == second:
            bucket[1] += 1
            bucket[2] += tokens
        else:
            bucket = [second, 1, tokens]
            buckets.append(bucket)
        self.requests += 1
        self.tokens += tokens
        return bucket


@dataclass(frozen=True, slots=True)
class RateLimited:
    reason: str  # "requests" | "tokens" | "unavailable" (the shared store failed and refuses)
    retry_after: int  # seconds


class StoreErrorPolicy(StrEnum):
    """What a shared limiter does while its store (Redis, the database) fails."""

    OPEN = "open"  # admit
    CLOSED = "closed"  # refuse with 429, Retry-After 1


class RateLimit(Protocol):
    """A limiter: in memory (one process) or shared (Redis, the database). Every one has `close`."""

    async def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        """Admit one request with an estimated token cost, or say when to retry. Returns (refusal, ticket)."""
        ...

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        """Correct the admitted estimate to the actual tokens (shared implementations do it in the background)."""
        ...

    async def close(self) -> None:
        """Finish pending corrections and release connections."""
        ...


def retry_after(oldest: int, now: float) -> int:
    """Whole seconds until the bucket of second `oldest` leaves the window (at least 1)."""
    return max(1, math.ceil(oldest + WINDOW - now))


def freed_at(
    buckets: Iterable[Sequence[int]], used: int, spent: int, rpm: int | None, tpm: int | None, tokens: int, now: float
) -> int:
    """Retry-After of a refusal: until enough of the oldest buckets (second, requests, tokens; oldest
    first) have left for a request of `tokens` to pass both limits, as `acquire` admits it (a request
    refused for requests may not fit the tokens when one leaves either: the retry would be refused)."""
    at = int(now)
    for bucket in buckets:
        if (rpm is None or used < rpm) and (tpm is None or not tokens or not used or spent + tokens <= tpm):
            break
        at, used, spent = bucket[0], used - bucket[1], spent - bucket[2]
    return retry_after(at, now)


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._admitted = 0

    async def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        """Admit one request with an estimated token cost, or say when to retry.

        Returns (refusal, ticket); pass the ticket to `settle` with the actual tokens.
        """
        return self.acquire_now(user_id, tokens)

    def acquire_now(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        """`acquire` without a coroutine: this limiter never waits."""
        if self.rpm is None and self.tpm is None:
            return None, None
        now = self._clock()
        second = int(now)
        win = self._windows.get(user_id)
        if win is None:
            win = self._windows[user_id] = _Window()
        if win.buckets and win.buckets[0][0] <= second - WINDOW:
            win.expire(second)
        if self.rpm is not None and win.requests >= self.rpm:
            return RateLimited("requests", self._freed_at(win, tokens, now)), None
        if self.tpm is not None and tokens and win.requests and win.tokens + tokens > self.tpm:
            return RateLimited("tokens", self._freed_at(win, tokens, now)), None  # (a lone over-sized one passes)
        ticket = (win, win.admit(second, tokens), tokens)
        self._admitted += 1
        if self._admitted % SWEEP_EVERY == 0:
            self._sweep(second)
        return None, ticket

    def _freed_at(self, win: _Window, tokens: int, now: float) -> int:
        return freed_at(win.buckets, win.requests, win.tokens, self.rpm, self.tpm, tokens, now)

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        if not isinstance(ticket, tuple):
            return
        win, bucket, reserved = ticket
        if bucket:  # (emptied when it left the window, its tokens with it)
            win.tokens += actual_tokens - reserved
            bucket[2] += actual_tokens - reserved

    def _sweep(self, second: int) -> None:
        """Forget users with nothing left in the window (a window only expires when its user returns)."""
        idle = [u for u, w in self._windows.items() if not w.buckets or w.buckets[-1][0] <= second - WINDOW]
        for user_id in idle:
            del self._windows[user_id]

    async def close(self) -> None:
        return None
