"""Outbox sync: usage events from the store to Polar, at least once, deduplicated by external_id.

Claims (a lease per request) keep concurrent passes, in this process or another one on the
same database, from sending the same event on the normal path; Polar's permanent
external_id dedup covers the abnormal ones (lease expired mid-send, timeout after commit,
a request resent whole after some of its events were accepted). A bad event is isolated
(Polar rejects whole batches) so it can never block the queue; rejected `max_attempts` times,
it parks its request. An outage never parks anything: it only delays the next pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from gateway.metrics import NO_METRICS, Metrics
from gateway.polar.client import (
    BatchRejected,
    IngestResult,
    PolarAuthError,
    PolarBillingError,
    RetryableError,
    event_payload,
)
from gateway.store.base import Outbox, PendingEvent
from gateway.timeutil import utcnow

log = logging.getLogger("gateway.sync")

_MAX_RETRY_AFTER = 3600.0


class SyncFailure(StrEnum):
    """Why a batch did not go in (the `cause` label of the sync failures metric)."""

    REJECTED = "rejected"  # Polar refused events in it (422): they count attempts
    UNAVAILABLE = "unavailable"  # network, timeout, 429 or 5xx: the batch waits
    AUTH = "auth"  # the token or its scopes are wrong
    ERROR = "error"  # anything else, the store included


def _cause(exc: PolarBillingError) -> SyncFailure:
    if isinstance(exc, RetryableError):
        return SyncFailure.UNAVAILABLE
    return SyncFailure.AUTH if isinstance(exc, PolarAuthError) else SyncFailure.ERROR


class Ingestor(Protocol):
    async def ingest(self, events: Sequence[PendingEvent]) -> IngestResult: ...


@dataclass(slots=True)
class SyncResult:
    claimed: int = 0
    synced: int = 0  # accepted by Polar: inserted + duplicates
    inserted: int = 0
    duplicates: int = 0
    deferred: int = 0  # held back by an outage (network, timeout, 429, 5xx, auth): no attempt counted
    rejected: int = 0  # refused by Polar (422 for the event itself): an attempt counted
    parked: int = 0  # of the rejected, those that reached max_attempts and are now `failed`
    batches: int = 0  # ingest calls made
    error: str | None = None  # the outage that ended the pass early, if any
    retry_after: float = 0.0  # what Polar asked us to wait (429 Retry-After), if anything


@dataclass(slots=True)
class _Claim:
    """What became of one claim's events, settled per request at the end."""

    events: list[PendingEvent]
    rejected: dict[str, str] = field(default_factory=dict)  # request id -> Polar's reason
    deferred: list[PendingEvent] = field(default_factory=list)

    @property
    def request_ids(self) -> list[str]:
        return list(dict.fromkeys(e.request_id for e in self.events))


class Syncer:
    """Sends the outbox to Polar.

    An outage (Polar unreachable, slow, rate limiting, failing, or refusing the token) is Polar's
    state, not the events': the loop backs off as a whole and the events stay pending, with no
    attempt counted, so they go out by themselves when Polar is back. Only Polar rejecting an event
    itself (422) counts an attempt against it and, after `max_attempts`, parks its request.
    """

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
        backoff_base: float = 2.0,
        backoff_max: float = 300.0,
        max_batches_per_pass: int = 100,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.polar = polar
        self.owner = owner
        self.batch_size = max(1, batch_size)
        self.max_batch_bytes = max_batch_bytes
        self.interval = interval
        self.max_attempts = max(1, max_attempts)
        self.lease_seconds = lease_seconds
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_batches_per_pass = max_batches_per_pass
        self.outages = 0  # consecutive passes ended by an outage
        # Did the last ingest call reach a working Polar? None until the first call. A rejection (422)
        # is Polar working; an outage (unreachable, timeout, 429, 5xx, refused token) is not.
        self.last_call_ok: bool | None = None
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
        """Sync every `interval` seconds, sooner on wake(); after an outage, again after a capped
        backoff (not woken early: Polar is down for everyone). Keeps going until `stop`."""
        while not stop.is_set():
            self._wake.clear()
            delay = self.interval
            try:
                result = await self.run_once()
                if result.claimed:
                    log.info(
                        "sync pass: %d claimed, %d synced (%d duplicates), %d deferred, %d rejected (%d parked)",
                        result.claimed,
                        result.synced,
                        result.duplicates,
                        result.deferred,
                        result.rejected,
                        result.parked,
                    )
                if result.error is not None:
                    delay = self.outage_delay(result.retry_after)
                    log.warning("Polar unavailable (%s); next sync in %.1f s", result.error, delay)
            except Exception:
                self.metrics.sync_failed(SyncFailure.ERROR)
                self.outages += 1
                delay = self.outage_delay()
                log.exception("sync pass failed; next sync in %.1f s", delay)
            waiters = [asyncio.ensure_future(stop.wait())]
            if self.outages == 0:
                waiters.append(asyncio.ensure_future(self._wake.wait()))
            try:
                await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    def outage_delay(self, retry_after: float = 0.0) -> float:
        """Wait before the next pass after `outages` failed ones: the backoff, at least Retry-After
        (itself capped, so a wild header cannot stall billing for long)."""
        return max(self.backoff(self.outages - 1), min(retry_after, _MAX_RETRY_AFTER))

    async def run_once(self, *, everything: bool = False) -> SyncResult:
        """One pass: claim, send in bounded batches, record each outcome; stops early if Polar is unavailable.

        `everything` also sends the events waiting out a rejection's backoff (`gateway sync`)."""
        result = SyncResult()
        for _ in range(self.max_batches_per_pass):
            events = await self.store.claim_events(
                self.owner, self.batch_size, self.lease_seconds, due_only=not everything
            )
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
                self.outages += 1
                return result
            if len(claim.request_ids) < self.batch_size:  # the store had fewer requests waiting
                break
        self.outages = 0
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
        """Send a batch; on 422 set the bad events aside and resend the rest (bisect if Polar named none).

        Returns the outage that stopped delivery and the events it left unresolved."""
        if not chunk:
            return None, []
        result.batches += 1
        self.metrics.sync_attempt()
        try:
            outcome = await self.polar.ingest(chunk)
        except BatchRejected as exc:
            self.last_call_ok = True
            self.metrics.sync_failed(SyncFailure.REJECTED)
            return await self._split(chunk, exc, claim, result)
        except PolarBillingError as exc:  # RetryableError, PolarAuthError, anything else from Polar
            self.last_call_ok = False
            self.metrics.sync_failed(_cause(exc))
            return exc, chunk
        self.last_call_ok = True
        result.synced += len(chunk)
        result.inserted += outcome.inserted
        result.duplicates += outcome.duplicates
        return None, []

    async def _split(
        self, chunk: list[PendingEvent], exc: BatchRejected, claim: _Claim, result: SyncResult
    ) -> tuple[PolarBillingError | None, list[PendingEvent]]:
        if len(chunk) == 1:
            self._reject({0: exc.reasons.get(0, exc.reason)}, chunk, claim, result)
            return None, []
        bad = {i for i in exc.bad_indexes if 0 <= i < len(chunk)}
        if bad:
            self._reject({i: exc.reasons.get(i, exc.reason) for i in bad}, chunk, claim, result)
            return await self._deliver([e for i, e in enumerate(chunk) if i not in bad], claim, result)
        mid = len(chunk) // 2
        error, left = await self._deliver(chunk[:mid], claim, result)
        if error is not None:
            return error, [*left, *chunk[mid:]]
        return await self._deliver(chunk[mid:], claim, result)

    def _reject(self, reasons: dict[int, str], chunk: list[PendingEvent], claim: _Claim, result: SyncResult) -> None:
        for i, reason in reasons.items():
            claim.rejected.setdefault(chunk[i].request_id, reason)
            log.warning("Polar rejected event %s: %s", chunk[i].external_id, reason)
        result.rejected += len(reasons)

    async def _settle(self, claim: _Claim, error: PolarBillingError | None, result: SyncResult) -> None:
        """Record the claim's outcome per request: a request is synced only when every one of its
        events was accepted; one rejected event counts an attempt against it (parking it at
        max_attempts); one deferred event defers it, with no attempt counted."""
        if claim.rejected:
            await self._count_rejections(claim, result)
        deferred = [e for e in claim.deferred if e.request_id not in claim.rejected]
        if error is not None:
            self._note_outage(error, deferred, result)
        if deferred:
            await self.store.mark_deferred(sorted({e.request_id for e in deferred}), str(error))
        left = claim.rejected.keys() | {e.request_id for e in claim.deferred}
        synced = [rid for rid in claim.request_ids if rid not in left]
        if synced:
            await self.store.mark_synced(synced)

    async def _count_rejections(self, claim: _Claim, result: SyncResult) -> None:
        attempts = {e.request_id: e.attempts for e in claim.events}
        groups: dict[tuple[int, str], list[str]] = defaultdict(list)
        for rid, reason in claim.rejected.items():
            groups[(attempts[rid], reason)].append(rid)
        for (n, reason), ids in groups.items():
            await self.store.mark_retry(ids, reason, self.backoff(n), self.max_attempts)
            if n + 1 >= self.max_attempts:
                ids_set = set(ids)
                result.parked += sum(1 for e in claim.events if e.request_id in ids_set)
                log.error("parked %d request(s) Polar rejected %d time(s): %s", len(ids), n + 1, reason)

    def _note_outage(self, error: PolarBillingError, deferred: list[PendingEvent], result: SyncResult) -> None:
        result.error = str(error)
        result.deferred += len(deferred)
        result.retry_after = float(getattr(error, "retry_after", None) or 0.0)
        if isinstance(error, PolarAuthError):  # needs a person, but the events only wait for the fix
            log.error("sync held back: %s", error)
        else:
            log.warning("sync deferred %d event(s): %s", len(deferred), error)

    def backoff(self, n: int) -> float:
        """base x 2^n, capped, with jitter in [50%, 100%] so many gateways don't retry in lockstep."""
        return min(self.backoff_max, self.backoff_base * 2 ** min(max(n, 0), 30)) * random.uniform(0.5, 1.0)
