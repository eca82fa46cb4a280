"""The one owner of a metered request's billing: `begin` takes everything, `Hold.finish` settles it.

Begin admits the request on the rate limit, reserves its most possible usage on the quota ledger
and journals it (durable before anything is forwarded); a refusal at any step releases what the
earlier steps took. Finish journals the final usage, settles ledger and limiter and hands the record
to the recorder. Nothing here knows about HTTP: a background poller settling a provider batch
begins and finishes the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from gateway.billing.ledger import InProcessLedger
from gateway.billing.protocols import QuotaLedger, RateLimit, Reservation
from gateway.deadlines import log_store_failure, within
from gateway.journal import Segment
from gateway.metering import Usage
from gateway.meters import NOT_TOKENS, bounded
from gateway.metrics import NO_METRICS, Metrics
from gateway.outcomes import Outcome
from gateway.quota import Refusal
from gateway.ratelimit.limiter import RateLimited, RateLimiter
from gateway.recording import estimate_from_reservation
from gateway.refusals import NO_REFUSALS, RefusalSink
from gateway.store.base import RequestRecord
from gateway.timeutil import stamp

log = logging.getLogger("gateway.billing")


class RequestJournal(Protocol):
    def begin(self, record: RequestRecord) -> Segment | None:
        """Durable before forwarding; raises OSError when the disk refuses."""
        ...

    def finish(self, record: RequestRecord) -> Segment | None: ...


class RecordSink(Protocol):
    def add(self, record: RequestRecord, segments: list[Segment | None]) -> None: ...


class RefusalKind(StrEnum):
    RATE_LIMITED = "rate_limited"
    QUOTA = "quota"
    UNRECORDABLE = "unrecordable"  # the journal refused the request: it could not be billed
    STORE_UNAVAILABLE = "store_unavailable"  # the quota could not be checked: the store failed or did not answer


@dataclass(frozen=True, slots=True)
class Refused:
    kind: RefusalKind
    rate: RateLimited | None = None  # set when rate limited
    quota: Refusal | None = None  # set when the quota refused


@dataclass(slots=True)
class Result:
    """How a begun request ended."""

    status: int | None
    outcome: Outcome
    usage: Usage | None
    estimated: bool = False  # the usage may fall short; with none seen at all, the reservation is billed


def token_total(usage: Mapping[str, int]) -> int:
    total = sum(usage.values())  # C-level; the rare counts and subsets are subtracted
    for meter in NOT_TOKENS:
        if meter in usage:
            total -= usage[meter]
    return total


class BillingOwner:
    def __init__(
        self,
        ledger: QuotaLedger,
        limiter: RateLimit,
        journal: RequestJournal,
        recorder: RecordSink,
        metrics: Metrics = NO_METRICS,
        refusals: RefusalSink = NO_REFUSALS,
        store_timeout: float = 5.0,
    ) -> None:
        self.ledger = ledger
        self.store_timeout = store_timeout  # the longest a request waits on the store for its reservation
        self.limiter = limiter
        self.journal = journal
        self.recorder = recorder
        self.metrics = metrics
        self.refusals = refusals
        # The single-process limiter and ledger can begin a request without waiting (`begin_now`).
        self._now = (
            (limiter, ledger) if isinstance(limiter, RateLimiter) and isinstance(ledger, InProcessLedger) else None
        )

    def _refused(self, refused: Refused) -> Refused:
        if refused.rate is not None:
            status, reason = 429, refused.rate.reason
        elif refused.kind is RefusalKind.QUOTA:
            status, reason = 402, RefusalKind.QUOTA.value
        else:
            status, reason = 503, refused.kind.value
        self.metrics.refused(status, reason)
        self.refusals.count(status, reason)
        return refused

    async def admit(self, user_id: str) -> Refused | None:
        """An unmetered request: counted against requests per minute only, nothing to settle."""
        limited, _ = await self.limiter.acquire(user_id, 0)
        return None if limited is None else self._refused(Refused(RefusalKind.RATE_LIMITED, rate=limited))

    async def begin(self, record: RequestRecord, rate_tokens: int) -> Hold | Refused:
        """Take what `record` (its user, key and `reservation`) needs before it runs, or refuse.

        `rate_tokens` counts against tokens per minute until finish corrects it to the actual total.
        """
        record.reservation = bounded(record.reservation)  # a client's absurd cap: see `MAX_TOKENS_PER_REQUEST`
        user_id = record.user_id
        limited, ticket = await self.limiter.acquire(user_id, rate_tokens)
        if limited is not None:
            return self._refused(Refused(RefusalKind.RATE_LIMITED, rate=limited))
        ledger = self.ledger
        try:
            reservation = ledger.reserve_held(user_id, record.reservation)
            if reservation is None:
                reservation = await within(
                    ledger.reserve(user_id, record.reservation), self.store_timeout, self._give_back
                )
        except Exception as exc:
            self.limiter.settle(user_id, ticket, 0)
            log_store_failure(log, f"refused a request of {user_id}: the quota could not be checked", exc)
            return self._refused(Refused(RefusalKind.STORE_UNAVAILABLE))
        except BaseException:
            self.limiter.settle(user_id, ticket, 0)
            raise
        return self._hold(record, reservation, ticket)

    def _give_back(self, reservation: Reservation | Refusal) -> None:
        """A reservation granted after its request stopped waiting: nothing will use it."""
        if isinstance(reservation, Reservation):
            self.ledger.settle(reservation, {})

    def begin_now(self, record: RequestRecord, rate_tokens: int) -> Hold | Refused | None:
        """`begin` without a coroutine when nothing has to be waited for (the single-process limiter
        and ledger, the user's quota loaded); None otherwise, having taken nothing."""
        if self._now is None:
            return None
        limiter, ledger = self._now
        record.reservation = bounded(record.reservation)  # as in `begin`
        user_id = record.user_id
        uq = ledger.ledger.cached(user_id)
        if uq is None:
            return None
        limited, ticket = limiter.acquire_now(user_id, rate_tokens)
        if limited is not None:
            return self._refused(Refused(RefusalKind.RATE_LIMITED, rate=limited))
        return self._hold(record, ledger.reserve_loaded(user_id, record.reservation, uq), ticket)

    def _hold(self, record: RequestRecord, reservation: Reservation | Refusal, ticket: object | None) -> Hold | Refused:
        """After the rate limit admitted the request: the reservation's refusal, or the journal entry and the hold."""
        user_id = record.user_id
        if isinstance(reservation, Refusal):
            self.limiter.settle(user_id, ticket, 0)
            return self._refused(Refused(RefusalKind.QUOTA, quota=reservation))
        try:
            begun = self.journal.begin(record)
        except OSError:
            log.exception("could not journal request %s", record.id)
            self.ledger.settle(reservation, {})
            self.limiter.settle(user_id, ticket, 0)
            return self._refused(Refused(RefusalKind.UNRECORDABLE))
        except BaseException:
            # Not journaled for another reason (a reservation too large for its JSON): an error
            # answer, but nothing it took may stay taken.
            self.ledger.settle(reservation, {})
            self.limiter.settle(user_id, ticket, 0)
            raise
        self.metrics.reservation_taken()
        return Hold(self, record, reservation, ticket, begun)


class Hold:
    """What a begun request holds until it finishes: its reservation, rate ticket and journal entry."""

    __slots__ = ("_owner", "begun", "record", "reservation", "settled", "ticket")

    def __init__(
        self,
        owner: BillingOwner,
        record: RequestRecord,
        reservation: Reservation,
        ticket: object | None,
        begun: Segment | None,
    ) -> None:
        self._owner = owner
        self.record = record
        self.reservation = reservation
        self.ticket = ticket
        self.begun = begun
        self.settled = False

    def finish(self, result: Result) -> None:
        """Bill `result`: journal the final usage, settle ledger and limiter, hand the record to the
        recorder. Settles once; a second call changes nothing."""
        if self.settled:
            return
        self.settled = True
        owner, record, usage = self._owner, self.record, result.usage
        record.status_code = result.status
        # A plain str: the store binds it without adapting (`_value_`: `.value` is a Python-level property).
        record.outcome = result.outcome._value_
        record.estimated = result.estimated
        record.usage = {k: v for k, v in usage.meters.items() if v} if usage else {}
        record.usage_raw = usage.raw if usage else None
        if result.estimated and not (usage and usage.seen):
            # The client left and the drain ended before any usage: the provider may still bill it.
            record.usage = estimate_from_reservation(record.reservation)
        record.usage = bounded(record.usage)  # a provider's absurd count: see `MAX_TOKENS_PER_REQUEST`
        record.finished_at, record.finished_iso = stamp()
        try:
            try:
                finished = owner.journal.finish(record)
            except TypeError:
                # The provider's raw usage does not write back as JSON (orjson reads 1,024 levels deep,
                # writes 254): kept without it, billed all the same.
                record.usage_raw = None
                finished = owner.journal.finish(record)
        except OSError:
            # The begin stays in the journal: recovery at the next start settles it by estimate.
            log.exception("could not journal the end of request %s", record.id)
            finished = None
        owner.ledger.settle(self.reservation, record.usage)
        owner.limiter.settle(record.user_id, self.ticket, token_total(record.usage))
        owner.recorder.add(record, [self.begun, finished])
        owner.metrics.reservation_settled(record.usage)
