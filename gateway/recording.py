"""Turning a finished request into durable records, and settling what a crash left in flight."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from gateway.meters import (
    CLAUDE_CACHE_READ,
    CLAUDE_CACHE_WRITE,
    COUNT_METERS,
    GEMINI_CACHED,
    GEMINI_IMAGES,
)
from gateway.quota import Ledger, UserQuota
from gateway.services import Services
from gateway.store.base import RequestRecord, Store, UsageEvent
from gateway.timeutil import utcnow

log = logging.getLogger("gateway.recording")


def usage_events(record: RequestRecord) -> list[UsageEvent]:
    """One event per non-zero meter, one per image; ids are derived, so a replay dedups."""
    events: list[UsageEvent] = []
    for meter, value in sorted(record.usage.items()):
        if value <= 0:
            continue
        if meter in COUNT_METERS:
            events.extend(
                UsageEvent(
                    f"{record.id}:{meter}:{i}",
                    record.id,
                    record.user_id,
                    meter,
                    1,
                    record.model,
                    record.provider,
                    record.started_at,
                )
                for i in range(value)
            )
        else:
            events.append(
                UsageEvent(
                    f"{record.id}:{meter}",
                    record.id,
                    record.user_id,
                    meter,
                    value,
                    record.model,
                    record.provider,
                    record.started_at,
                )
            )
    return events


def token_total(usage: Mapping[str, int]) -> int:
    return sum(v for k, v in usage.items() if k != GEMINI_IMAGES)


async def finish_and_settle(s: Services, record: RequestRecord, uq: UserQuota, ticket: object) -> None:
    record.finished_at = utcnow()
    events = usage_events(record)
    try:
        await s.store.finish_request(record, events)
    except Exception:
        # The in-flight row stays; recovery at the next start settles it from the reservation.
        log.exception("could not record request %s; it stays in flight for recovery", record.id)
    Ledger.settle(uq, record.reservation, record.usage)
    s.limiter.settle(record.user_id, ticket, token_total(record.usage))
    if events:
        s.on_events(len(events))


# The reservation covers every input meter with the whole input estimate; a crash
# estimate bills it once, as plain input, not three times.
_NOT_ESTIMATED = frozenset({CLAUDE_CACHE_WRITE, CLAUDE_CACHE_READ, GEMINI_CACHED})


def estimate_from_reservation(reservation: Mapping[str, int]) -> dict[str, int]:
    """What to bill when the provider's usage never reached us: the most the request could use."""
    return {m: v for m, v in reservation.items() if m not in _NOT_ESTIMATED and v > 0}


async def recover_in_flight(store: Store, owner: str) -> int:
    """Settle requests a dead process left in flight: bill the reservation, marked estimated."""
    settled = 0
    for record in await store.in_flight_requests():
        if record.owner == owner:
            continue
        record.usage = estimate_from_reservation(record.reservation)
        record.outcome = "crashed"
        record.estimated = True
        record.finished_at = utcnow()
        await store.finish_request(record, usage_events(record))
        settled += 1
    if settled:
        log.warning("settled %d request(s) left in flight by a stopped process (estimated)", settled)
    released = await store.release_claims(owner)
    if released:
        log.warning("re-queued %d usage event(s) a stopped sync had claimed (Polar dedups any resend)", released)
    return settled
