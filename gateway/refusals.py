"""Refusals counted per hour for the dashboard, without a store write per refused request.

`count` is a dict increment on the request's path; `run_forever` adds what was counted to the store
every few seconds, and `close` once more at shutdown, as one `count = count + n` per hour, status
and reason. Being additive, processes and replicas each add their own. When the store refuses, the
counts stay for the next flush (the oldest hours dropped past a bound) and the error is logged once
per outage; a request never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from gateway.metrics import NO_METRICS, Metrics
from gateway.store.refusals_base import RefusalCount, RefusalStore

log = logging.getLogger("gateway.refusals")

FLUSH_SECONDS = 5.0
MAX_KEPT = 10_000  # (hour, status, reason) keys kept while the store refuses: weeks of an outage

Key = tuple[int, int, str]  # (hour as unix seconds of its start, status, reason)


class RefusalSink(Protocol):
    """Where the billing owner, the proxy and the billing portal report a request they refused."""

    def count(self, status: int, reason: str) -> None: ...


class NoRefusals:
    """Counts nothing (a billing owner built without a counter)."""

    def count(self, status: int, reason: str) -> None:
        pass


NO_REFUSALS = NoRefusals()


class RefusalCounter:
    def __init__(
        self,
        store: RefusalStore,
        *,
        interval: float = FLUSH_SECONDS,
        metrics: Metrics = NO_METRICS,
        clock: Callable[[], float] = time.time,
        max_kept: int = MAX_KEPT,
    ) -> None:
        self._store = store
        self._interval = interval
        self._metrics = metrics
        self._clock = clock
        self._max_kept = max_kept
        # The hour under way counts by (status, reason) alone: a refusal costs a clock read, a
        # comparison and a dict increment. Earlier hours wait in `_kept` by (hour, status, reason).
        self._hour = 0  # unix seconds of its start
        self._hour_ends = 0.0
        self._counts: dict[tuple[int, str], int] = {}
        self._kept: dict[Key, int] = {}
        self._lock = asyncio.Lock()  # one flush at a time (the loop's and the last one at close)
        self.failing = False  # the last flush failed (logged then; later failures are not)
        self.dropped = 0  # counts given up on since start (the store refused for too long)

    def count(self, status: int, reason: str) -> None:
        if self._clock() >= self._hour_ends:
            self._next_hour()
        counts, key = self._counts, (status, reason)
        counts[key] = counts.get(key, 0) + 1

    def _next_hour(self) -> None:
        self._keep(self._take_hour())
        now = int(self._clock())
        self._hour = now - now % 3600
        self._hour_ends = self._hour + 3600.0

    def _take_hour(self) -> dict[Key, int]:
        counts, self._counts = self._counts, {}
        hour = self._hour
        return {(hour, status, reason): n for (status, reason), n in counts.items()}

    @property
    def pending(self) -> int:
        """Refusals counted and not stored yet."""
        return sum(self._counts.values()) + sum(self._kept.values())

    async def flush(self) -> None:
        """Add what was counted to the store; on an error keep it for the next flush."""
        async with self._lock:
            taken, self._kept = self._kept, {}
            for key, n in self._take_hour().items():
                taken[key] = taken.get(key, 0) + n
            if not taken:
                return
            rows = [
                RefusalCount(datetime.fromtimestamp(hour, UTC), status, reason, n)
                for (hour, status, reason), n in taken.items()
            ]
            try:
                await self._store.add_refusals(rows)
            except BaseException as exc:
                self._keep(taken)
                if not isinstance(exc, Exception):
                    raise  # cancelled: the counts stay for `close`
                self._metrics.store_error("add_refusals")
                if not self.failing:
                    self.failing = True
                    log.warning("could not store refusal counts (%s): kept for the next try", exc)
                return
            if self.failing:
                self.failing = False
                log.info("refusal counts stored again (%d given up on since start)", self.dropped)

    def _keep(self, taken: dict[Key, int]) -> None:
        """Keep counts of past hours (or ones the store refused) for the next flush, bounded."""
        kept = self._kept
        for key, n in taken.items():
            kept[key] = kept.get(key, 0) + n
        if len(kept) > self._max_kept:
            for key in sorted(kept)[: len(kept) - self._max_kept]:  # the oldest hours first
                self.dropped += kept.pop(key)

    async def run_forever(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval)
            await self.flush()

    async def close(self) -> None:
        """The last flush, before the store closes: what a failing store still holds is lost."""
        await self.flush()
        if self.pending:  # (a failed flush keeps them in `_kept`)
            log.warning("stopping with %d refusals not stored", self.pending)
