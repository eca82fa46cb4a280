"""Refusals counted in memory and added to the store in the background, on a fake store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from gateway.refusals import RefusalCounter
from gateway.store.dashboard_base import Step
from gateway.store.refusals_base import RefusalCount as C
from tests.conftest import wait_until_async

H = datetime(2026, 12, 4, 10, tzinfo=UTC)
AT = H.timestamp()


class FakeRefusalStore:
    """Sums what is added, like the table; refuses while `failing`."""

    def __init__(self) -> None:
        self.failing = False
        self.calls = 0
        self.rows: dict[tuple[datetime, int, str], int] = {}

    async def add_refusals(self, counts: Sequence[C]) -> None:
        self.calls += 1
        if self.failing:
            raise OSError("database is locked")
        keys = [(c.start, c.status, c.reason) for c in counts]
        assert len(set(keys)) == len(keys), "each key at most once"
        for c in counts:
            self.rows[c.start, c.status, c.reason] = self.rows.get((c.start, c.status, c.reason), 0) + c.count

    async def refusals(self, since: datetime, step: Step) -> list[C]:
        raise AssertionError("the counter only writes")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_counts_by_hour_status_and_reason_and_flushes_once() -> None:
    store, clock = FakeRefusalStore(), Clock(AT + 3599.9)  # 10:59:59.9
    counter = RefusalCounter(store, clock=clock)
    for _ in range(3):
        counter.count(401, "invalid_key")
    counter.count(429, "requests")
    clock.now = AT + 3600  # 11:00
    counter.count(401, "invalid_key")
    assert counter.pending == 5 and store.calls == 0  # nothing written per refusal
    await counter.flush()
    await counter.flush()  # nothing new: no write at all
    assert store.calls == 1 and counter.pending == 0
    eleven = datetime(2026, 12, 4, 11, tzinfo=UTC)
    assert store.rows == {(H, 401, "invalid_key"): 3, (H, 429, "requests"): 1, (eleven, 401, "invalid_key"): 1}


async def test_a_failing_store_keeps_the_counts_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    store, clock = FakeRefusalStore(), Clock(AT)
    counter = RefusalCounter(store, clock=clock)
    store.failing = True
    caplog.set_level(logging.INFO, "gateway.refusals")
    for _ in range(4):
        counter.count(402, "quota")
        await counter.flush()  # fails, keeps
    assert counter.failing and counter.pending == 4 and store.rows == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "could not store refusal counts (database is locked): kept for the next try"
    ]
    store.failing = False
    counter.count(402, "quota")
    await counter.flush()
    assert store.rows == {(H, 402, "quota"): 5} and counter.pending == 0 and not counter.failing
    assert caplog.records[-1].getMessage() == "refusal counts stored again (0 given up on since start)"


async def test_kept_counts_are_bounded_dropping_the_oldest_hours() -> None:
    store, clock = FakeRefusalStore(), Clock(AT)
    counter = RefusalCounter(store, clock=clock, max_kept=2)
    store.failing = True
    for hour in range(4):  # 10:00 .. 13:00, one count more each hour
        clock.now = AT + hour * 3600
        for _ in range(hour + 1):
            counter.count(401, "invalid_key")
        await counter.flush()
    assert counter.dropped == 1 + 2 and counter.pending == 3 + 4
    store.failing = False
    await counter.flush()
    assert store.rows == {
        (datetime(2026, 12, 4, 12, tzinfo=UTC), 401, "invalid_key"): 3,
        (datetime(2026, 12, 4, 13, tzinfo=UTC), 401, "invalid_key"): 4,
    }


async def test_a_cancelled_flush_keeps_the_counts() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    class Stuck(FakeRefusalStore):
        async def add_refusals(self, counts: Sequence[C]) -> None:
            entered.set()
            await release.wait()

    store = Stuck()
    counter = RefusalCounter(store, clock=Clock(AT))
    counter.count(429, "tokens")
    task = asyncio.create_task(counter.flush())
    await entered.wait()
    counter.count(429, "tokens")  # counted while the flush waits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counter.pending == 2


async def test_flushes_every_interval_and_at_close() -> None:
    store = FakeRefusalStore()
    counter = RefusalCounter(store, interval=0.01, clock=Clock(AT))
    stop = asyncio.Event()
    loop = asyncio.create_task(counter.run_forever(stop))
    counter.count(401, "invalid_key")

    async def flushed() -> bool:
        return store.rows == {(H, 401, "invalid_key"): 1}

    await wait_until_async(flushed)
    stop.set()
    await loop
    counter.count(401, "invalid_key")  # after the loop ended: `close` takes it
    await counter.close()
    assert store.rows == {(H, 401, "invalid_key"): 2} and counter.pending == 0


async def test_closing_on_a_failing_store_says_how_many_refusals_were_not_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeRefusalStore()
    store.failing = True
    counter = RefusalCounter(store, clock=Clock(AT))
    for _ in range(3):
        counter.count(429, "requests")
    caplog.set_level(logging.WARNING, "gateway.refusals")
    await counter.close()
    assert [r.getMessage() for r in caplog.records][-1] == "stopping with 3 refusals not stored"
