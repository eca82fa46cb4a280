"""Outbox sync: usage events from the store to Polar, at least once, deduplicated by external_id.

Claims (a lease per request) keep concurrent passes, in this process or another one on the
same database, from sending the same event on the normal path; Polar's permanent
external_id dedup covers the abnormal ones (lease expired mid-send, timeout after commit,
a request resent whole after some of its events were accepted). A bad event is isolated
(Polar rejects whole batches) so it can never block the queue; it parks its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from gateway.polar import BatchRejected, IngestResult, PolarAuthError, PolarBillingError, event_payload
from gateway.store.base import Outbox, PendingEvent
from gateway.timeutil import utcnow

log = logging.getLogger("gateway.sync")


class Ingestor(Protocol):
    async def ingest(self, events: Sequence[PendingEvent]) -> IngestResult: ...


@dataclass(slots=True)
class SyncResult:
    claimed: int = 0
    synced: int = 0  # accepted by Polar: inserted + duplicates
    inserted: int = 0
    duplicates: int = 0
    retried: int = 0  # scheduled for a later attempt (or parked by max_attempts)
    failed: int = 0  # rejected by Polar, parked with the reason
    batches: int = 0  # ingest calls made
    error: str | None = None  # the transient error that ended the pass early, if any


@dataclass(slots=True)
class _Claim:
    """What became of one claim's events, settled per request at the end."""

    events: list[PendingEvent]
    parked: dict[str, str] = field(default_factory=dict)  # request id -> Polar's reason
    deferred: list[PendingEvent] = field(default_factory=list)

    @property
    def request_ids(self) -> list[str]:
        return list(dict.fromkeys(e.request_id for e in self.events))


class Syncer:
    def __init__(
        self,
        store: Outbox,
        polar: Ingestor,
        *,
        owner: str,
        batch_size: int = 500,
        max_batch_bytes: int = 1_000_000,
        interval: float = 300.0,
        max_attempts: int = 3,
        lease_seconds: float = 120.0,
        backoff_base: float = 30.0,
        backoff_max: float = 3600.0,
        max_batches_per_pass: int = 100,
    ) -> None:
        self.store = store
        self.polar = polar
        self.owner = owner
        self.batch_size = max(1, batch_size)
        self.max_batch_bytes = max_batch_bytes
        self.interval = interval
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_batches_per_pass = max_batches_per_pass
        self._wake = asyncio.Event()
        self._new_events = 0

    # ------------------------------------------------------------------ triggers (hot path: O(1), no I/O)
    def notify(self, n_new_events: int) -> None:
        """Called after new events are durable; wakes the loop once a full batch is waiting."""
        self._new_events += n_new_events
        if self._new_events >= self.batch_size:
            self.wake()

    def wake(self) -> None:
        self._new_events = 0
        self._wake.set()

    # ------------------------------------------------------------------ loop
    async def run_forever(self, stop: asyncio.Event) -> None:
        """Sync every `interval` seconds, sooner on wake(); logs errors and keeps going until `stop`."""
        while not stop.is_set():
            self._wake.clear()
            try:
                result = await self.run_once()
                if result.claimed:
                    log.info(
                        "sync pass: %d claimed, %d synced (%d duplicates), %d retry, %d failed",
                        result.claimed,
                        result.synced,
                        result.duplicates,
                        result.retried,
                        result.failed,
                    )
            except Exception:
                log.exception("sync pass failed; will retry next round")
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    async def run_once(self) -> SyncResult:
        """One pass: claim, send in bounded batches, record each outcome; stops early if Polar is unavailable."""
        result = SyncResult()
        for _ in range(self.max_batches_per_pass):
            events = await self.store.claim_events(self.owner, self.batch_size, self.lease_seconds)
            if not events:
                break
            result.claimed += len(events)
            claim = _Claim(events)
            chunks = self._chunks(events)
            error: PolarBillingError | None = None
            for i, chunk in enumerate(chunks):
                error, unresolved = await self._deliver(chunk, claim, result)
                if error is not None:
                    claim.deferred += unresolved
                    claim.deferred += [e for later in chunks[i + 1 :] for e in later]
                    break
            await self._settle(claim, error, result)
            if error is not None:
                return result
            if len(claim.request_ids) < self.batch_size:  # the store had fewer requests waiting
                break
        return result

    def _chunks(self, events: list[PendingEvent]) -> list[list[PendingEvent]]:
        """Split a claim into batches of at most batch_size events and max_batch_bytes of JSON
        (at least one event each)."""
        now = utcnow()
        chunks: list[list[PendingEvent]] = [[]]
        size = 16  # {"events":[]}
        for event in events:
            n = len(json.dumps(event_payload(event, now), separators=(",", ":"))) + 1
            if chunks[-1] and (size + n > self.max_batch_bytes or len(chunks[-1]) >= self.batch_size):
                chunks.append([])
                size = 16
            chunks[-1].append(event)
            size += n
        return chunks

    async def _deliver(
        self, chunk: list[PendingEvent], claim: _Claim, result: SyncResult
    ) -> tuple[PolarBillingError | None, list[PendingEvent]]:
        """Send a batch; on 422 park the bad events and resend the rest (bisect if Polar named none).

        Returns the transient error that stopped delivery and the events it left unresolved."""
        if not chunk:
            return None, []
        result.batches += 1
        try:
            outcome = await self.polar.ingest(chunk)
        except BatchRejected as exc:
            return await self._split(chunk, exc, claim, result)
        except PolarBillingError as exc:  # RetryableError, PolarAuthError, anything else from Polar
            return exc, chunk
        result.synced += len(chunk)
        result.inserted += outcome.inserted
        result.duplicates += outcome.duplicates
        return None, []

    async def _split(
        self, chunk: list[PendingEvent], exc: BatchRejected, claim: _Claim, result: SyncResult
    ) -> tuple[PolarBillingError | None, list[PendingEvent]]:
        if len(chunk) == 1:
            self._park({0: exc.reasons.get(0, exc.reason)}, chunk, claim, result)
            return None, []
        bad = {i for i in exc.bad_indexes if 0 <= i < len(chunk)}
        if bad:
            self._park({i: exc.reasons.get(i, exc.reason) for i in bad}, chunk, claim, result)
            return await self._deliver([e for i, e in enumerate(chunk) if i not in bad], claim, result)
        mid = len(chunk) // 2
        error, left = await self._deliver(chunk[:mid], claim, result)
        if error is not None:
            return error, [*left, *chunk[mid:]]
        return await self._deliver(chunk[mid:], claim, result)

    def _park(self, reasons: dict[int, str], chunk: list[PendingEvent], claim: _Claim, result: SyncResult) -> None:
        for i, reason in reasons.items():
            claim.parked.setdefault(chunk[i].request_id, reason)
            log.warning("parking event %s rejected by Polar: %s", chunk[i].external_id, reason)
        result.failed += len(reasons)

    async def _settle(self, claim: _Claim, error: PolarBillingError | None, result: SyncResult) -> None:
        """Record the claim's outcome per request: a request is synced only when every one of its
        events was accepted; one parked event parks it; one deferred event defers it."""
        by_reason: dict[str, list[str]] = defaultdict(list)
        for rid, reason in claim.parked.items():
            by_reason[reason].append(rid)
        for reason, ids in by_reason.items():
            await self.store.mark_failed(ids, reason)
        deferred = [e for e in claim.deferred if e.request_id not in claim.parked]
        if error is not None and deferred:
            await self._defer(deferred, error, result)
        left = claim.parked.keys() | {e.request_id for e in claim.deferred}
        synced = [rid for rid in claim.request_ids if rid not in left]
        if synced:
            await self.store.mark_synced(synced)

    async def _defer(self, events: list[PendingEvent], error: PolarBillingError, result: SyncResult) -> None:
        """Polar unavailable: back off (honouring Retry-After). Auth errors leave the lease to expire
        instead, so a bad token never burns the events' attempts."""
        result.error = str(error)
        if isinstance(error, PolarAuthError):
            log.error("sync stopped: %s", error)
            return
        result.retried += len(events)
        log.warning("sync deferred %d event(s): %s", len(events), error)
        retry_after = getattr(error, "retry_after", None) or 0.0
        now = utcnow()
        by_attempts: dict[int, set[str]] = defaultdict(set)
        for e in events:
            by_attempts[e.attempts].add(e.request_id)
        for attempts, ids in by_attempts.items():
            delay = max(self.backoff(attempts), float(retry_after))
            await self.store.mark_retry(sorted(ids), str(error), now + timedelta(seconds=delay), self.max_attempts)

    def backoff(self, attempts: int) -> float:
        """Exponential with jitter in [50%, 100%] so many gateways don't retry in lockstep."""
        return min(self.backoff_max, self.backoff_base * 2 ** min(attempts, 30)) * random.uniform(0.5, 1.0)
