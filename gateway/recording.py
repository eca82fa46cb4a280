"""Turning a finished request into durable records, and settling what a crash left in flight."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from gateway.events import event_count
from gateway.journal import Journal, Segment, orphans
from gateway.meters import CLAUDE_CACHE_READ, CLAUDE_CACHE_WRITE, CLAUDE_CACHE_WRITE_1H, GEMINI_CACHED
from gateway.metrics import NO_METRICS, Metrics
from gateway.outcomes import Outcome
from gateway.store.base import RecordRejected, RecoveryStore, RequestRecord, RequestStore
from gateway.timeutil import utcnow

log = logging.getLogger("gateway.recording")

_RECOVERY_BATCH = 2000  # records per transaction when a dead process's journal is stored


# A finished request waiting for the store: its record, the journal segments holding it, and how
# many times the store refused it. A plain tuple: one is made per request.
_Finished = tuple[RequestRecord, list[Segment | None], int]


class Recorder:
    """Takes finished requests to the store in batches, off the request path.

    Why: a commit per request costs a thread round trip and a WAL write each; the journal already
    holds every finished request durably, so the store can take them `linger` seconds later, many
    per transaction. While the store takes nothing (down, locked) everything waits, with backoff;
    a record it refuses on its own (`RecordRejected`) is left to the journal at once, and the next
    recovery quarantines it (`recover_journal`); one failing otherwise is retried a few times first.
    """

    def __init__(
        self,
        store: RequestStore,
        journal: Journal,
        on_events: Callable[[int], None] = lambda n: None,
        on_stored: Callable[[Sequence[RequestRecord]], None] = lambda records: None,
        linger: float = 0.02,
        max_batch: int = 2000,
        max_attempts: int = 3,
        retry_seconds: float = 0.5,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.journal = journal
        self.on_events = on_events
        self.on_stored = on_stored  # after each commit, with the records it stored
        self.linger = linger
        self.max_batch = max_batch
        self.max_attempts = max_attempts
        self.retry_seconds = retry_seconds  # first backoff; doubles while the store takes nothing, up to 60x
        self._queue: list[_Finished] = []
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = 0.0
        self._storing = 0  # records in the batch being written

    @property
    def backlog(self) -> int:
        """Finished requests not yet in the store."""
        return len(self._queue) + self._storing

    def add(self, record: RequestRecord, segments: list[Segment | None]) -> None:
        self._queue.append((record, segments, 0))
        if len(self._queue) >= self.max_batch:
            self._full.set()
        if self._task is None or self._task.done():
            # A context of its own: the task outlives the request that happened to start it (its log request id).
            self._task = asyncio.create_task(self._run(), name="recorder", context=contextvars.Context())

    async def _run(self) -> None:
        while self._queue:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.linger)
            self._full.clear()
            batch, self._queue = self._queue, []
            self._storing = len(batch)
            try:
                pause = await self._store(batch)
            finally:
                self._storing = 0  # before the pause: what failed is back in the queue, counted there
            if pause:
                await asyncio.sleep(pause)

    async def _store(self, batch: list[_Finished]) -> float:
        """Store a batch; what fails goes back to the queue. Returns how long to wait before the next."""
        records = [record for record, _, _ in batch]
        try:
            await self.store.finish_requests(records)
        except Exception:
            self.metrics.store_error("finish_requests")
            # One bad record must not hold back the others: go one by one.
            results = await asyncio.gather(*(self.store.finish_request(r) for r in records), return_exceptions=True)
            return self._stored_some(batch, results)
        self.journal.stored([seg for _, segments, _ in batch for seg in segments])
        self._stored(records)
        self._backoff = 0.0
        return 0.0

    def _stored(self, records: list[RequestRecord]) -> None:
        """Tell the ledger and the sync that these records are in the store."""
        if records:
            self.on_stored(records)
        events = 0
        for r in records:
            events += event_count(r.usage)
        if events:
            self.on_events(events)

    def _stored_some(self, batch: list[_Finished], results: list[BaseException | None]) -> float:
        """After a failed batch, stored one by one: settle what went in, queue what failed again."""
        stored: list[Segment | None] = []
        records: list[RequestRecord] = []
        failed: list[_Finished] = []
        rejected = 0
        for f, result in zip(batch, results, strict=True):
            if result is None:
                records.append(f[0])
                stored += f[1]
            elif isinstance(result, RecordRejected):
                # Refused for what it holds: trying again fails again, and it says nothing of an
                # outage. Its segment stays (pending) and the next recovery quarantines it.
                rejected += 1
                log.error(
                    "the store refuses request %s (%s); the journal keeps it for the next start to set aside",
                    f[0].id,
                    result.reason,
                )
            else:
                failed.append(f)
        self.journal.stored(stored)
        self._stored(records)
        if failed or rejected:
            self.metrics.store_error("finish_request", len(failed) + rejected)
        if not failed:
            self._backoff = 0.0
            return 0.0
        if len(failed) == len(batch) - rejected:
            # Nothing went in: the store is down or locked, not these records. Keep them all and wait.
            self._backoff = min(max(2 * self._backoff, self.retry_seconds), 60 * self.retry_seconds)
            why = _reason(results)
            log.warning("could not store %d request(s) (%s); retrying in %.1f s", len(failed), why, self._backoff)
            self._queue = failed + self._queue
            return self._backoff
        # The store works but refuses these: a few more tries, then the journal keeps them.
        for record, segments, attempts in failed:
            if attempts + 1 < self.max_attempts:
                self._queue.append((record, segments, attempts + 1))
            else:
                log.error("could not store request %s; the journal keeps it for the next start", record.id)
        return self.retry_seconds

    async def close(self, grace_seconds: float = 10.0) -> None:
        """Store everything queued (at shutdown). If the store cannot take it in `grace_seconds`,
        stop trying: the journal keeps it for the next start."""
        try:
            async with asyncio.timeout(grace_seconds):
                while self._task is not None and not self._task.done():
                    self._full.set()
                    await asyncio.shield(self._task)
        except TimeoutError:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            log.error("shutting down with %d request(s) not stored; the journal keeps them", len(self._queue))


async def store_or_reject(store: RequestStore, records: list[RequestRecord]) -> dict[str, str]:
    """Store `records`, but those the store refuses on their own: their ids, with why. A refused
    batch is halved until the refused records stand alone (a few transactions for one bad record
    in thousands). An outage raises, as before."""
    try:
        await store.finish_requests(records)  # idempotent: replays are dropped
        return {}
    except RecordRejected as exc:
        if len(records) == 1:
            return {records[0].id: exc.reason}
    half = len(records) // 2
    return await store_or_reject(store, records[:half]) | await store_or_reject(store, records[half:])


def _reason(results: list[BaseException | None]) -> str:
    return next((type(r).__name__ for r in results if r is not None), "")


# The reservation covers every input meter with the whole input estimate; a crash
# estimate bills it once, as plain input, not three times (nor the 1-hour part of cache
# writes, which would bill a premium on writes the estimate does not bill). Web searches are
# estimated like output and images: the reservation is the most the provider may have charged.
_NOT_ESTIMATED = frozenset({CLAUDE_CACHE_WRITE, CLAUDE_CACHE_WRITE_1H, CLAUDE_CACHE_READ, GEMINI_CACHED})


def estimate_from_reservation(reservation: Mapping[str, int]) -> dict[str, int]:
    """What to bill when the provider's usage never reached us: the most the request could use."""
    return {m: v for m, v in reservation.items() if m not in _NOT_ESTIMATED and v > 0}


async def recover(store: RecoveryStore, journal_dir: Path | None, owner: str, metrics: Metrics = NO_METRICS) -> int:
    """At start, before serving: store what dead processes journaled and hand back their sync claims."""
    settled = await recover_journal(store, journal_dir, metrics)
    released = await store.release_claims(owner)
    if released:
        log.warning("re-queued %d request(s) a stopped sync had claimed (Polar dedups any resend)", released)
    return settled


async def recover_journal(store: RequestStore, journal_dir: Path | None, metrics: Metrics = NO_METRICS) -> int:
    """Store what dead processes left in their journals: finished requests exactly, requests that
    were still in flight by estimate (the provider may have billed them). Returns how many were
    estimated. Safe beside a live gateway: its segments are locked and skipped.

    A record the store refuses on its own (`RecordRejected`) would fail every start, and a keeper
    would never settle its dead process: its journal lines go to `rejected/` beside the journal
    (`Orphans.quarantine`), the rest is stored, and the segments go. An outage still raises."""
    found = orphans(journal_dir)
    try:
        stored = await store.finished_ids([r.id for r in found.unfinished])
        estimated: list[RequestRecord] = []
        for record in found.unfinished:
            if record.id in stored:
                continue
            record.usage = estimate_from_reservation(record.reservation)
            record.outcome = Outcome.CRASHED.value
            record.estimated = True
            record.finished_at = utcnow()
            estimated.append(record)
        settled = len(estimated)
        # In batches, as the recorder stores: a journal left by a long outage holds hundreds of
        # thousands, and a transaction each would hold the start (or a keeper's settling) for minutes.
        records = found.finished + estimated
        rejected: dict[str, str] = {}
        for at in range(0, len(records), _RECOVERY_BATCH):
            rejected.update(await store_or_reject(store, records[at : at + _RECOVERY_BATCH]))
        if rejected:
            found.quarantine(rejected)
    except BaseException:
        found.release()  # (our locks would make the next recovery, and `held`, take them for live)
        raise
    found.discard()
    for rid, reason in rejected.items():
        log.error("the store refuses request %s (%s); set aside in the journal's rejected/ directory", rid, reason)
    if rejected:
        metrics.rejected(len(rejected))
    if found.finished:
        log.warning("stored %d finished request(s) a stopped process had journaled", len(found.finished))
    if settled:
        log.warning("settled %d request(s) left in flight by a stopped process (estimated)", settled)
    return settled
