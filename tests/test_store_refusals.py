"""The store contract for refusals per hour, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway.store import Store
from gateway.store.dashboard_base import Step
from gateway.store.refusals_base import RefusalCount as C
from tests.support_db import Database, open_store

pytestmark = pytest.mark.both_backends

H = datetime(2026, 12, 4, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)


async def test_adding_adds_to_the_count_of_the_hour_status_and_reason(store: Store) -> None:
    await store.add_refusals([C(H, 401, "invalid_key", 2), C(H, 429, "requests", 1)])
    await store.add_refusals([C(H, 401, "invalid_key", 3), C(H + HOUR, 401, "invalid_key", 1), C(H, 429, "tokens", 4)])
    await store.add_refusals([])
    assert await store.refusals(H, Step.HOUR) == [
        C(H, 401, "invalid_key", 5),
        C(H, 429, "requests", 1),
        C(H, 429, "tokens", 4),
        C(H + HOUR, 401, "invalid_key", 1),
    ]


async def test_hours_from_the_one_holding_since_per_hour_and_per_day(store: Store) -> None:
    day = datetime(2026, 12, 4, tzinfo=UTC)
    await store.add_refusals(
        [
            C(day - HOUR, 402, "quota", 7),  # 23:00 the day before
            C(day, 402, "quota", 1),
            C(day + 10 * HOUR, 402, "quota", 2),
            C(day + 10 * HOUR, 401, "invalid_key", 3),
            C(day + 23 * HOUR, 503, "unrecordable", 1),
            C(day + 24 * HOUR, 429, "unavailable", 6),  # the next day
        ]
    )
    # a window starting at 10:15 takes the whole 10:00 hour, not the ones before
    since = day + 10 * HOUR + timedelta(minutes=15)
    assert await store.refusals(since, Step.HOUR) == [
        C(day + 10 * HOUR, 401, "invalid_key", 3),
        C(day + 10 * HOUR, 402, "quota", 2),
        C(day + 23 * HOUR, 503, "unrecordable", 1),
        C(day + 24 * HOUR, 429, "unavailable", 6),
    ]
    assert await store.refusals(day - timedelta(days=13), Step.DAY) == [
        C(day - timedelta(days=1), 402, "quota", 7),
        C(day, 401, "invalid_key", 3),
        C(day, 402, "quota", 3),
        C(day, 503, "unrecordable", 1),
        C(day + timedelta(days=1), 429, "unavailable", 6),
    ]
    # a day window starting mid-day takes from that hour on
    assert await store.refusals(day + 10 * HOUR, Step.DAY) == [
        C(day, 401, "invalid_key", 3),
        C(day, 402, "quota", 2),
        C(day, 503, "unrecordable", 1),
        C(day + timedelta(days=1), 429, "unavailable", 6),
    ]
    assert await store.refusals(day + 25 * HOUR, Step.HOUR) == []


async def test_processes_adding_at_once_add_up(db: Database, store: Store) -> None:
    """Each process (here: a store connection of its own) adds its counts; none overwrites another's."""
    others = [await open_store(db.url) for _ in range(3)]
    try:
        await asyncio.gather(
            *(s.add_refusals([C(H, 401, "invalid_key", n), C(H, 402, "quota", 1)]) for n in range(1, 4) for s in others)
        )
    finally:
        for s in others:
            await s.close()
    assert await store.refusals(H, Step.HOUR) == [C(H, 401, "invalid_key", 3 * 6), C(H, 402, "quota", 9)]
