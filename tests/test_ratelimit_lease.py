"""Leases of the per-minute budget (gateway/ratelimit/lease.py) on real backends: exact across
processes, slices sized by demand and bounded near the limit, handed back when their second ends,
and a round trip per user and second rather than per request.

Each limiter stands for a process. Time is injected (the limiters' test hook: it stands for the
backend's clock and the process's monotonic clock alike), except where the timer is the point.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.ratelimit.budget import Grant, Want, slice_of
from gateway.ratelimit.lease import LeasedRateLimiter
from gateway.ratelimit.limiter import RateLimited, StoreErrorPolicy
from gateway.ratelimit.shared import StoreRateLimiter
from gateway.store.sqlite import SqliteStore
from gateway.timeutil import suspend_clock
from tests.conftest import poll_until, wait_until_async
from tests.support_ratelimit import KINDS, Clock, Counting, Make, admitted, shared_backend


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    async with shared_backend(request.param, tmp_path) as make:
        yield make


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(tmp_path / "one.db"))
    await store.open()
    await store.migrate()
    yield store
    await store.close()


async def burst(limiters: list[LeasedRateLimiter], n: int, tokens: int = 0, actual: int | None = None) -> list[bool]:
    """`n` parallel acquires round-robin over the limiters, each settled at once to `actual` tokens."""

    async def one(rl: LeasedRateLimiter) -> bool:
        refusal, ticket = await rl.acquire("u", tokens)
        if refusal is None and actual is not None:
            rl.settle("u", ticket, actual)
        return refusal is None

    return await asyncio.gather(*(one(limiters[i % len(limiters)]) for i in range(n)))


async def next_second(clock: Clock, limiters: list[LeasedRateLimiter], at: float) -> None:
    """Move the clock to `at`; the limiters hand back the leases of the seconds that ended."""
    clock.now = at
    for rl in limiters:
        rl.reap()
    for rl in limiters:
        await rl.flush()


def test_a_slice_is_a_fraction_of_the_room_and_never_less_than_the_request() -> None:
    want = Want(requests=50, tokens=5000, need=100, rpm=1000, tpm=100_000)
    assert slice_of([], 7.5, want) == Grant(7, 7.5, 50, 5000, 100_000)  # what it asked: room to spare
    full = [(1, 900, 90_000)]  # 100 requests and 10,000 tokens left: 12 and 1,250 at most
    assert slice_of(full, 7.5, want) == Grant(7, 7.5, 12, 1250, 10_000)
    nearly = [(1, 993, 99_500)]  # near the limit: the request itself
    assert slice_of(nearly, 7.5, want) == Grant(7, 7.5, 1, 100, 500)
    assert slice_of([(1, 1000, 0)], 7.5, want) == RateLimited("requests", 54)
    assert slice_of([(1, 5, 99_950)], 7.5, want) == RateLimited("tokens", 54)
    lone = Want(requests=1, tokens=500, need=500, rpm=None, tpm=100)
    assert slice_of([(1, 0, 0)], 7.5, lone) == Grant(7, 7.5, 1, 500, 100)  # a window of handed-back buckets is empty
    unlimited = Want(requests=40, tokens=0, need=0, rpm=None, tpm=None)
    assert slice_of([(1, 10**9, 0)], 7.5, unlimited) == Grant(7, 7.5, 40, 0, 0)


async def test_three_processes_admit_exactly_the_requests_limit_and_never_more(backend: Make) -> None:
    clock = Clock(1000.5)
    limiters = [await backend(100, None, clock) for _ in range(3)]
    per_second = []
    for second in range(1000, 1010):  # a burst a second, all in one window
        await next_second(clock, limiters, second + 0.5)
        per_second.append(sum(await burst(limiters, 90)))
        assert sum(per_second) <= 100
    assert sum(per_second) == 100
    again = 0
    for i, second in enumerate(range(1060, 1070)):  # the window slides: second 1000's leave at 1060, ...
        await next_second(clock, limiters, second + 0.5)
        again += sum(await burst(limiters, 120))
        assert again <= sum(per_second[: i + 1])
    assert again == 100


async def test_three_processes_admit_exactly_the_tokens_limit_with_corrections(backend: Make) -> None:
    clock = Clock(1000.5)
    limiters = [await backend(None, 1000, clock) for _ in range(3)]
    used = 0
    for second in range(1000, 1020):
        await next_second(clock, limiters, second + 0.5)
        used += 7 * sum(await burst(limiters, 60, tokens=10, actual=7))  # estimated 10, used 7
        assert used <= 1000
    # What the in-memory limiter admits: while the window's 7s leave room for an estimate of 10.
    assert used == 994
    assert await limiters[0].acquire("u", 10) == (RateLimited("tokens", 41), None)


async def test_a_rest_handed_back_at_the_end_of_its_second_goes_to_another_process(backend: Make) -> None:
    clock = Clock(1000.0)
    a, b = await backend(24, None, clock), await backend(24, None, clock)
    assert sum(await burst([a], 3)) == 3  # three waiting: a slice of 3 (24 / 8)
    assert await admitted(a)  # asks twice the 3 it admitted, gets 21 / 8 = 2, holds 1
    assert sum(await burst([b], 30)) == 19  # 24 booked: 23 admitted, 1 held by a
    assert await b.acquire("u", 0) == (RateLimited("requests", 60), None)
    await next_second(clock, [a, b], 1001.0)  # a's second ended: its 1 back
    assert await admitted(b)
    assert await b.acquire("u", 0) == (RateLimited("requests", 59), None)


async def test_a_refund_kept_in_a_lease_is_room_for_the_next_request_of_its_process(backend: Make) -> None:
    clock = Clock(1000.0)
    rl = await backend(None, 200, clock)
    refusal, ticket = await rl.acquire("u", 160)
    assert refusal is None
    rl.settle("u", ticket, 21)  # 139 back: 25 (200 / 8) stay in the lease, 114 go to the backend
    await rl.flush()
    refusal, _ = await rl.acquire("u", 160)  # the lease's 25 go back with this take: 21 + 160 fit
    assert refusal is None
    assert await rl.acquire("u", 20) == (RateLimited("tokens", 60), None)  # 181 + 20 do not


async def test_near_the_limit_a_slice_is_the_request_itself(backend: Make) -> None:
    clock = Clock(1000.0)
    a, b, c = [await backend(15, None, clock) for _ in range(3)]  # 15 / 8: a slice of 1
    assert sum(await burst([a, b], 30)) == 15  # 30 waiting, yet every take books one
    await next_second(clock, [a, b, c], 1001.0)  # nothing held: nothing comes back
    assert await c.acquire("u", 0) == (RateLimited("requests", 59), None)


async def test_the_timer_hands_a_rest_back_when_its_second_ends(backend: Make) -> None:
    # The backend's clock and the real timer: within a second.
    a, b = await backend(80, None), await backend(80, None)
    assert sum(await burst([a], 2)) == 2  # a slice of 2
    assert await admitted(a)  # asks 4, gets 4 (78 / 8 = 9): holds 3
    got = sum(await burst([b], 100))  # 74, or 77 if a's second ended meanwhile
    while got < 77:  # a's rest comes back when its second ends
        assert await wait_until_async(lambda: admitted(b), within=3.0)
        got += 1
    assert not await admitted(b)


async def test_a_busy_user_costs_a_round_trip_a_second_not_a_request(sqlite_store: SqliteStore) -> None:
    clock = Clock(1000.0)
    budget = Counting(sqlite_store)
    rl = LeasedRateLimiter(budget, 100_000, 100_000_000, clock=clock)
    for i in range(1000):  # one at a time: the slices grow with what the lease admitted
        clock.now = 1000.0 + i / 1000
        refusal, ticket = await rl.acquire("u", 1000)
        assert refusal is None
        rl.settle("u", ticket, 40)  # in its second: the refund stays in the lease
    await rl.flush()
    assert (budget.takes, budget.corrections) == (8, 0)  # 1, 2, 6, 18, ...: twice what the second admitted
    for i in range(1000):  # the next second: one take of twice the last second's
        clock.now = 1001.0 + i / 1000
        refusal, ticket = await rl.acquire("u", 1000)
        assert refusal is None
        rl.settle("u", ticket, 40)
    await rl.flush()
    assert (budget.takes, budget.corrections) == (9, 0)  # second 1000's rest went back with it
    await rl.close()
    assert budget.corrections == 1  # second 1001's
    rows = await asyncio.to_thread(_rows, sqlite_store.path)
    assert rows == [(1000, 1000, 40_000), (1001, 1000, 40_000)]  # what was admitted and used, exactly


def _rows(path: str) -> list[tuple[int, int, int]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT second, requests, tokens FROM rate_windows ORDER BY second").fetchall()


async def test_waiting_requests_share_a_take_and_its_refusal(sqlite_store: SqliteStore) -> None:
    clock = Clock(1000.0)
    budget = Counting(sqlite_store)
    rl = LeasedRateLimiter(budget, 10, None, clock=clock)
    assert sum(await burst([rl], 30)) == 10
    # Ten takes of one (10 / 8) for the request that asked; then one refusal for the 20 still waiting.
    assert budget.takes == 11
    await rl.close()


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="CLOCK_BOOTTIME is Linux's")
async def test_a_slice_ends_on_a_clock_that_counts_suspended_time(sqlite_store: SqliteStore) -> None:
    # A process resumed after a suspend must not admit from a slice of a second long gone: the other
    # processes' windows moved on meanwhile (CLOCK_MONOTONIC stops while suspended; CLOCK_BOOTTIME does not).
    rl = LeasedRateLimiter(sqlite_store, 10, None)
    assert rl._local is suspend_clock
    assert suspend_clock.func is time.clock_gettime  # type: ignore[attr-defined]
    assert suspend_clock.args == (time.CLOCK_BOOTTIME,)  # type: ignore[attr-defined]
    await rl.close()


@pytest.mark.parametrize("policy", [StoreErrorPolicy.OPEN, StoreErrorPolicy.CLOSED])
async def test_a_failing_store_answers_the_waiting_requests_with_the_policy(
    sqlite_store: SqliteStore, policy: StoreErrorPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1000.0)
    budget = Counting(sqlite_store)
    rl = LeasedRateLimiter(budget, 100, 10_000, policy, clock)
    caplog.set_level(logging.ERROR, logger="gateway.ratelimit")
    assert sum(await burst([rl], 4, tokens=10)) == 4  # a slice of 4 requests and 40 tokens, spent
    assert sum(await burst([rl], 6, tokens=10)) == 6  # a slice of twice 4 (and 80 tokens): 2 left
    budget.failing = True
    takes = budget.takes
    assert sum(await burst([rl], 2, tokens=10)) == 2  # the slice's rest: no round trip
    expected = (None, None) if policy is StoreErrorPolicy.OPEN else (RateLimited("unavailable", 1), None)
    assert await asyncio.gather(*(rl.acquire("u", 10) for _ in range(10))) == [expected] * 10
    assert budget.takes == takes + 1  # one take failed for the ten
    rl.settle("u", (1000, 10), 500)  # a correction that cannot be sent is logged (once a minute), not raised
    await rl.close()
    (line,) = [r for r in caplog.records if r.name == "gateway.ratelimit"]
    assert "rate-limit store failed 1 time(s)" in line.getMessage()


@pytest.mark.parametrize("policy", [StoreErrorPolicy.OPEN, StoreErrorPolicy.CLOSED])
async def test_a_store_that_does_not_answer_is_waited_for_a_bounded_time(
    sqlite_store: SqliteStore, policy: StoreErrorPolicy
) -> None:
    # A database that stops answering must not hold requests: the policy answers at the deadline,
    # and the slice the store books when it answers after all goes back (nobody spends it).
    clock = Clock(1000.0)
    budget = Counting(sqlite_store)
    budget.hang = asyncio.Event()
    rl = LeasedRateLimiter(budget, 100, 10_000, policy, clock, timeout=0.05)
    expected = (None, None) if policy is StoreErrorPolicy.OPEN else (RateLimited("unavailable", 1), None)
    assert await asyncio.wait_for(rl.acquire("u", 10), 5) == expected
    budget.hang.set()
    assert await poll_until(lambda: budget.corrections) == 1
    await rl.flush()
    assert await asyncio.to_thread(_rows, sqlite_store.path) == [(1000, 0, 0)]  # booked, then handed back
    await rl.close()


async def test_a_store_limiter_without_limits_never_asks_the_store(sqlite_store: SqliteStore) -> None:
    budget = Counting(sqlite_store)
    rl = StoreRateLimiter(budget, None, None)
    assert await rl.acquire("u", 10**9) == (None, None)
    assert budget.takes == 0
