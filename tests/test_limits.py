"""LimitsRefresher: stale or missing cached limits are refreshed from Polar in the background."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from gateway.meters import CLAUDE_INPUT, GEMINI_IMAGES
from gateway.polar.client import PolarBilling
from gateway.polar.limits import LimitsRefresher
from gateway.store import Store
from gateway.store.base import CustomerLimits, MeterLimit
from tests.fakes.polar import FakePolar


@pytest.fixture
async def polar(fake: FakePolar) -> AsyncIterator[PolarBilling]:
    client = PolarBilling(fake.token, base_url=fake.url, timeout=2.0, call_attempts=1)
    yield client
    await client.close()


def old_limits(user_id: str, age: timedelta) -> CustomerLimits:
    then = datetime.now(UTC) - age
    return CustomerLimits(user_id, {CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, 1)}, None, None, then, then)


async def test_refreshes_stale_and_missing_users_only(store: Store, polar: PolarBilling, fake: FakePolar) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    fake.set_state("stale-user", {CLAUDE_INPUT: (1000, 10.0)}, start, start + timedelta(days=31))
    fake.set_state("new-user", {GEMINI_IMAGES: (50, 2.0)}, start, start + timedelta(days=31))
    await store.put_limits(old_limits("stale-user", timedelta(hours=2)))
    await store.put_limits(old_limits("fresh-user", timedelta(seconds=5)))
    await store.create_key("k1", "new-user", "", "gw_abc", b"hash-1")
    await store.create_key("k2", "not-in-polar", "", "gw_def", b"hash-2")
    changed: list[str] = []

    async def on_changed(user_id: str) -> None:
        changed.append(user_id)

    refresher = LimitsRefresher(store, polar, 900.0, on_changed)
    assert sorted(await refresher.users_to_refresh()) == ["new-user", "not-in-polar", "stale-user"]
    assert await refresher.refresh_once() == 3
    assert sorted(changed) == ["new-user", "not-in-polar", "stale-user"]

    stale = await store.get_limits("stale-user")
    assert stale is not None
    assert stale.meters == {CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, credited=1000, consumed=10.0, balance=990.0)}
    assert (stale.period_start, stale.period_end) == (start, start + timedelta(days=31))
    new = await store.get_limits("new-user")
    assert new is not None and new.meters[GEMINI_IMAGES].credited == 50
    missing = await store.get_limits("not-in-polar")
    assert missing is not None and (missing.meters, missing.active) == ({}, True)  # the config plan applies
    fresh = await store.get_limits("fresh-user")
    assert fresh is not None and fresh.meters[CLAUDE_INPUT].credited == 1  # untouched
    assert "GET /v1/customers/external/fresh-user/state" not in fake.paths()
    assert await refresher.users_to_refresh() == []


async def test_polar_down_is_logged_and_retried_next_round(store: Store, polar: PolarBilling, fake: FakePolar) -> None:
    fake.set_state("u1", {CLAUDE_INPUT: (7, 0.0)})
    await store.put_limits(old_limits("u1", timedelta(hours=1)))
    refresher = LimitsRefresher(store, polar, 60.0, lambda _u: asyncio.sleep(0))
    fake.down(True)
    assert await refresher.refresh_once() == 0
    limits = await store.get_limits("u1")
    assert limits is not None and limits.meters[CLAUDE_INPUT].credited == 1
    fake.down(False)
    assert await refresher.refresh_once() == 1
    limits = await store.get_limits("u1")
    assert limits is not None and limits.meters[CLAUDE_INPUT].credited == 7


async def test_run_forever_refreshes_and_stops(store: Store, polar: PolarBilling, fake: FakePolar) -> None:
    fake.set_state("u2", {CLAUDE_INPUT: (42, 0.0)})
    await store.put_limits(old_limits("u2", timedelta(hours=1)))
    refreshed = asyncio.Event()

    async def on_changed(_user: str) -> None:
        refreshed.set()

    stop = asyncio.Event()
    refresher = LimitsRefresher(store, polar, 60.0, on_changed, interval=30.0)
    task = asyncio.create_task(refresher.run_forever(stop))
    await asyncio.wait_for(refreshed.wait(), 10)
    limits = await store.get_limits("u2")
    assert limits is not None and limits.meters[CLAUDE_INPUT].credited == 42
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 5
