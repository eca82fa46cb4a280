"""Shared rate limits on real backends: Redis, SQLite (one file, several processes), PostgreSQL.

Each limiter instance stands for a process; three share one backend. Time is injected (the
limiters' test hook) except where the backend's own clock is the point. The leases' own tests are
in test_ratelimit_lease.py.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from gateway.ratelimit.limiter import RateLimited, RateLimiter, StoreErrorPolicy
from gateway.ratelimit.redis_backend import RedisBudget, RedisRateLimiter
from gateway.ratelimit.settler import on_store_error
from gateway.ratelimit.shared import PORTAL_KEY, StoreRateLimiter, make_limiter, make_portal_limiter
from gateway.settings import ConfigError, FileConfig, RateLimitConfig, Settings, parse_file_config, settings_from_env
from gateway.store.sqlite import SqliteStore
from tests.conftest import REDIS_URL, free_port, wait_until_async
from tests.fakes.link import FreezableLink
from tests.support_ratelimit import KINDS, Clock, Counting, Make, admitted, down, lock_waiting, shared_backend


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    async with shared_backend(request.param, tmp_path) as make:
        yield make


@pytest.fixture(params=["sqlite", "postgres"])
async def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    async with shared_backend(request.param, tmp_path) as make:
        yield make


@pytest.fixture
async def redis_backend(tmp_path: Path) -> AsyncIterator[Make]:
    async with shared_backend("redis", tmp_path) as make:
        yield make


@pytest.fixture
def redis_link() -> Iterator[FreezableLink]:
    """Redis reached through a relay that can break a connection before an answer comes back."""
    parts = urlsplit(REDIS_URL)
    relay = FreezableLink(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    try:
        yield relay
    finally:
        relay.stop()


async def test_thirty_parallel_acquires_over_three_processes_admit_exactly_ten(backend: Make) -> None:
    # The backend's own clock (Redis TIME, the database's clock): no test hook.
    limiters = [await backend(10, None) for _ in range(3)]
    results = await asyncio.gather(*(limiters[i % 3].acquire("par", 0) for i in range(30)))
    refusals = [r for r, _ in results if r is not None]
    assert len(results) - len(refusals) == 10
    assert len(refusals) == 20
    assert all(r.reason == "requests" and 59 <= r.retry_after <= 60 for r in refusals), refusals


async def test_requests_window_slides_with_exact_retry_after(backend: Make) -> None:
    clock = Clock(1000.2)
    a, b, c = [await backend(3, None, clock) for _ in range(3)]
    assert await admitted(a) and await admitted(b)
    clock.now = 1010.5
    assert await admitted(c)
    assert await a.acquire("u", 0) == (RateLimited("requests", 50), None)  # second 1000 leaves at 1060
    assert await admitted(b, "other")  # per user
    clock.now = 1059.99
    assert await b.acquire("u", 0) == (RateLimited("requests", 1), None)
    clock.now = 1060.0
    assert await admitted(c) and await admitted(a)  # two freed, two taken
    assert await b.acquire("u", 0) == (RateLimited("requests", 10), None)  # second 1010 leaves at 1070


async def test_retry_after_a_requests_refusal_waits_for_the_tokens_too_shared(backend: Make) -> None:
    clock = Clock(1000.0)
    a, b = await backend(3, 100, clock), await backend(3, 100, clock)
    for at in (1000.0, 1010.0, 1020.0):
        clock.now = at
        assert await admitted(a, tokens=30)
    clock.now = 1030.0
    assert await b.acquire("u", 50) == (RateLimited("requests", 40), None)  # not 30: 60 + 50 > 100
    # Requests waiting on one take: each is told when it fits, not when the one that asked does.
    results = await asyncio.gather(b.acquire("u", 0), b.acquire("u", 50))
    assert results == [(RateLimited("requests", 30), None), (RateLimited("requests", 40), None)]
    clock.now = 1069.9
    assert not await admitted(b, tokens=50)
    clock.now = 1070.0
    assert await admitted(b, tokens=50)


async def test_tokens_are_reserved_then_corrected_by_settle(backend: Make) -> None:
    clock = Clock()
    a, b = [await backend(None, 100, clock) for _ in range(2)]
    refusal, first = await a.acquire("u", 80)  # the estimate
    assert refusal is None
    assert await b.acquire("u", 30) == (RateLimited("tokens", 60), None)
    a.settle("u", first, 10)  # it used 10
    await a.flush()
    _, second = await b.acquire("u", 30)
    assert second is not None
    assert await a.acquire("u", 70) == (RateLimited("tokens", 60), None)  # 40 + 70 > 100
    clock.now = 1030.0
    b.settle("u", second, 50)  # corrections add up: 10 + 50
    await b.flush()
    assert await a.acquire("u", 41) == (RateLimited("tokens", 30), None)  # freeing second 1000 is enough
    assert await admitted(a, tokens=40)  # 60 + 40 fits exactly


async def test_a_lone_oversized_request_passes_and_an_expired_ticket_settles_nothing(backend: Make) -> None:
    clock = Clock()
    a, b = [await backend(None, 100, clock) for _ in range(2)]
    refusal, ticket = await a.acquire("u", 500)
    assert refusal is None and ticket is not None
    assert await b.acquire("u", 1) == (RateLimited("tokens", 60), None)
    clock.now += 61
    a.settle("u", ticket, 5)
    await a.flush()
    assert await admitted(b, tokens=100)
    assert await a.acquire("u", 1) == (RateLimited("tokens", 60), None)


async def test_a_request_of_more_tokens_than_a_backend_integer_holds_is_a_lone_oversized_one(
    backend: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # The estimate is the client's max_tokens (up to 2**64 - 1 in JSON): PostgreSQL and SQLite refused
    # it as if the store failed (the policy then decides), Redis booked garbage and let the user past
    # the limit for the window.
    clock = Clock(1000.0)
    rl = await backend(60, 1000, clock, StoreErrorPolicy.CLOSED)
    caplog.set_level(logging.ERROR, logger="gateway.ratelimit")
    refusal, ticket = await rl.acquire("u", 2**64 - 1)
    assert refusal is None  # alone in the window, as in memory
    assert await rl.acquire("u", 1) == (RateLimited("tokens", 60), None)
    rl.settle("u", ticket, 0)  # the provider refused it
    await rl.flush()
    clock.now = 1001.5
    rl.reap()
    await rl.flush()
    assert sum([await admitted(rl, tokens=100) for _ in range(15)]) == 10
    assert caplog.records == []


async def _spent_twenty_of_eighty(rl: Any, clock: Clock) -> object:
    """An estimate of 80 tokens admitted at second 1000 and not yet settled; its second has ended (so
    its correction goes to the backend, none of it into the lease)."""
    refusal, ticket = await rl.acquire("u", 80)
    assert refusal is None
    clock.now = 1001.5
    return ticket


async def _window_holds_one_request_of_twenty_tokens(rl: Any) -> None:
    # (limits 2 requests, 100 tokens per minute: twenty tokens if 80 fits and 81 does not, one request
    # if a second one passes and a third does not)
    assert await rl.acquire("u", 81) == (RateLimited("tokens", 59), None)
    assert await admitted(rl, tokens=80)
    assert await rl.acquire("u", 0) == (RateLimited("requests", 59), None)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_correction_batch_that_failed_is_applied_once_when_the_backend_answers_again(
    kind: str, tmp_path: Path
) -> None:
    # A failed batch was logged and dropped: the window kept the estimate (80, not 20) for a minute,
    # in every process, and refused the user's requests that fitted.
    async with shared_backend(kind, tmp_path) as make, down(kind, tmp_path) as dead:
        clock = Clock(1000.0)
        a, b = await make(2, 100, clock), await make(2, 100, clock)
        ticket = await _spent_twenty_of_eighty(a, clock)
        up, a.budget = a.budget, Counting(dead)  # the backend goes down: a real failure of its kind
        a.settle("u", ticket, 20)

        async def retried() -> bool:
            return a.budget.corrections >= 2

        await wait_until_async(retried)  # failed, kept, tried again (and failed again)
        a.budget.inner = up  # the backend answers again
        await a.flush()
        await _window_holds_one_request_of_twenty_tokens(b)


async def test_a_batch_postgresql_refused_and_rolled_back_is_sent_again(tmp_path: Path) -> None:
    async with shared_backend("postgres", tmp_path) as make:
        clock = Clock(1000.0)
        a, b = await make(2, 100, clock), await make(2, 100, clock)
        ticket = await _spent_twenty_of_eighty(a, clock)
        a.budget = store = Counting(a.budget)
        pool = b.budget.pool
        await pool.execute("ALTER TABLE rate_windows RENAME TO rate_windows_away")
        a.settle("u", ticket, 20)

        async def retried() -> bool:
            return store.corrections >= 2

        await wait_until_async(retried)  # the server's error (no such table) rolled it back: kept
        await pool.execute("ALTER TABLE rate_windows_away RENAME TO rate_windows")
        await a.flush()
        await _window_holds_one_request_of_twenty_tokens(b)


async def test_a_batch_whose_answer_was_lost_after_it_was_applied_is_not_sent_again(backend: Make) -> None:
    # A batch that may have been applied (the connection dropped, a timeout, after the backend had it) is
    # not retried: applied twice, a hand-back would let the user past the limit.
    clock = Clock(1000.0)
    a, b = await backend(2, 100, clock), await backend(2, 100, clock)
    ticket = await _spent_twenty_of_eighty(a, clock)
    a.budget = store = Counting(a.budget)
    store.lost = True
    a.settle("u", ticket, 20)
    await a.flush()
    assert store.corrections == 1
    await _window_holds_one_request_of_twenty_tokens(b)


async def _buckets(rl: RedisRateLimiter, user: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await rl.redis.hgetall(rl.prefix + user)).items()}


async def test_a_correction_batch_redis_ran_whose_answer_a_broken_connection_lost_is_applied_once(
    redis_link: FreezableLink,
    redis_backend: Make,  # (this order: the limiters close before the relay stops)
) -> None:
    # redis-py's retry of a broken connection (meant for a pooled socket Redis closed while idle) sent
    # the whole pipeline of corrections again after Redis had run it: each applied twice, the hand-backs
    # undercounting the window (the user past the limit, in every process).
    clock = Clock(1000.0)
    a: RedisRateLimiter = await redis_backend(80, 8000, clock, url=f"redis://127.0.0.1:{redis_link.port}/0")
    refusal, first = await a.acquire("u", 100)  # a slice of the request alone
    assert refusal is None
    assert await admitted(a, "u", 100)  # a slice of two (twice what the last admitted), one left
    refusal, other = await a.acquire("v", 100)
    assert refusal is None
    assert await _buckets(a, "u") == {"r1000": 3, "t1000": 300}
    clock.now = 1001.5
    redis_link.cut_answer_to(b"EVALSHA")
    a.settle("u", first, 40)  # -60 tokens
    a.reap()  # u's rest goes back: -1 request, -100 tokens
    a.settle("v", other, 70)  # -30 tokens; all in one batch (nothing awaited since the first)
    await a.flush()
    assert redis_link.cuts == 1
    assert await _buckets(a, "u") == {"r1000": 2, "t1000": 140}
    assert await _buckets(a, "v") == {"r1000": 1, "t1000": 70}


async def test_a_take_redis_ran_whose_answer_a_broken_connection_lost_hands_the_rest_back_once(
    redis_link: FreezableLink,
    redis_backend: Make,  # (this order: the limiters close before the relay stops)
    caplog: pytest.LogCaptureFixture,
) -> None:
    # redis-py's retry of a broken connection ran the take's script again after Redis had run it: the
    # lease's rest it hands back went back twice (here 83 requests in the window instead of 91), and
    # other processes admitted that many more than the limit, exactly when room was tight.
    clock = Clock(1000.0)
    a: RedisRateLimiter = await redis_backend(
        100, 10000, clock, StoreErrorPolicy.CLOSED, url=f"redis://127.0.0.1:{redis_link.port}/0"
    )
    b: RedisRateLimiter = await redis_backend(100, None, clock)  # books requests only
    assert all(await asyncio.gather(*(admitted(a, "u", 10) for _ in range(11))))  # one slice of 11
    clock.now = 1001.0
    assert await admitted(a, "u", 10)  # a slice of 11 requests, 220 tokens: 10 and 210 left
    filled = 0
    while await admitted(b, "u"):
        filled += 1
    assert filled == 78  # the window is full, a's rest included
    assert await _buckets(a, "u") == {"r1000": 11, "t1000": 110, "r1001": 89, "t1001": 220}
    redis_link.cut_answer_to(b"EVALSHA")
    caplog.set_level(logging.ERROR, logger="gateway.ratelimit")
    # Its slice cannot cover 300 tokens: a take, handing back the rest (-10, -210) and booking a slice
    # of 1 request, 600 tokens (2 requests wanted, 1/8 of the 10 left); the answer never comes.
    assert await a.acquire("u", 300) == on_store_error(StoreErrorPolicy.CLOSED)
    assert redis_link.cuts == 1
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert await _buckets(a, "u") == {"r1000": 11, "t1000": 110, "r1001": 80, "t1001": 610}
    assert await admitted(a, "u", 10)  # one take failed, the next goes through (a new connection)
    assert await _buckets(a, "u") == {"r1000": 11, "t1000": 110, "r1001": 81, "t1001": 630}


async def test_pooled_redis_connections_redis_closed_while_idle_still_take_and_correct(
    redis_backend: Make, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing retries a command (a take or a batch Redis may have run would be applied twice): the
    # pool must replace a socket Redis closed while it was idle before handing it out.
    name = f"gw-test-{secrets.token_hex(4)}"
    clock = Clock(1000.0)
    a: RedisRateLimiter = await redis_backend(
        80, 8000, clock, StoreErrorPolicy.CLOSED, url=f"{REDIS_URL}?client_name={name}"
    )
    users = ["u0", "u1", "u2"]
    first = await asyncio.gather(*(a.acquire(user, 100) for user in users))  # three takes at once
    assert [refusal for refusal, _ in first] == [None] * 3
    clock.now = 1001.5
    a.settle("u0", first[0][1], 40)
    await a.flush()
    admin = Redis.from_url(REDIS_URL)

    async def kill_ours() -> set[int]:
        ids = {int(c["id"]) for c in await admin.client_list() if c["name"] == name}
        for client_id in ids:
            await admin.client_kill_filter(_id=str(client_id))
        return ids

    try:
        caplog.set_level(logging.ERROR, logger="gateway.ratelimit")
        killed = await kill_ours()
        assert len(killed) == 3  # one pooled connection per take at once; corrections use them too
        again = await asyncio.gather(*(a.acquire(user, 100) for user in users))
        # Admitted by Redis (the policy, closed, would refuse; its answer has no ticket): slices of two.
        assert again == [(None, (1001, 100))] * 3
        killed |= await kill_ours()
        a.settle("u0", again[0][1], 50)
        clock.now = 1002.5
        a.reap()  # (the rest of each slice of two goes back)
        await a.flush()
        assert await _buckets(a, "u0") == {"r1000": 1, "t1000": 40, "r1001": 1, "t1001": 50}
        for user in users[1:]:
            assert await _buckets(a, user) == {"r1000": 1, "t1000": 100, "r1001": 1, "t1001": 100}
        assert caplog.records == []  # no take or batch failed (nor was sent again after NotApplied)
        assert len(killed) == 6
    finally:
        await admin.aclose()


async def test_corrections_of_seconds_that_left_the_window_are_dropped_not_retried(backend: Make) -> None:
    clock = Clock(1000.0)
    a = await backend(2, 100, clock)
    ticket = await _spent_twenty_of_eighty(a, clock)
    a.budget = store = Counting(a.budget)
    store.failing = True
    a.settle("u", ticket, 20)

    async def failed() -> bool:
        return store.corrections >= 1

    await wait_until_async(failed)
    clock.now = 1060.0  # second 1000 leaves the window: its correction changes no decision any more
    started = time.monotonic()
    await a.flush()  # nothing left to send, with the backend still down
    assert time.monotonic() - started < 2.0
    tried = store.corrections
    store.failing = False
    await a.flush()
    assert store.corrections == tried  # dropped, not sent when the backend answers


async def test_shutdown_with_the_backend_down_ends_and_says_what_was_lost(
    backend: Make, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(1000.0)
    a = await backend(2, 100, clock)
    a.timeout = 0.5  # the store timeout bounds the last flush
    ticket = await _spent_twenty_of_eighty(a, clock)
    a.budget = store = Counting(a.budget)
    store.failing = True
    a.settle("u", ticket, 20)
    caplog.set_level(logging.WARNING, logger="gateway.ratelimit")
    started = time.monotonic()
    await asyncio.wait_for(a.close(), 5.0)
    assert time.monotonic() - started < 2.0
    assert store.corrections >= 1
    assert any("1 correction(s) not sent" in r.getMessage() for r in caplog.records), caplog.records


async def test_redis_keys_expire_with_their_user(redis_backend: Make) -> None:
    rl: RedisRateLimiter = await redis_backend(10, None)
    await rl.acquire("idle", 0)
    ttl = await rl.redis.pttl(rl.prefix + "idle")
    assert 110_000 < ttl <= 120_000


async def test_a_take_a_minute_after_the_last_sweeps_every_users_buckets_out_of_the_window(
    store_backend: Make,
) -> None:
    clock = Clock()
    rl: StoreRateLimiter = await store_backend(10, None, clock)
    rl.budget = store = Counting(rl.budget)
    assert await admitted(rl, "idle") and await admitted(rl, "u")  # the first take sweeps (nothing)
    clock.now = 1059.0
    assert await admitted(rl, "u")
    clock.now = 1061.0
    assert await admitted(rl, "u")  # a minute after the first: sweeps, in the background
    await rl.flush()
    assert store.sweeps == 2
    assert await store.rate_sweep(1061.0) == 0  # second 1000 (both users) is gone already
    assert await store.rate_sweep(1120.0) == 1  # second 1059 leaves at 1119
    assert await store.rate_sweep(1121.0) == 1  # second 1061 at 1121


@pytest.mark.parametrize("policy", [StoreErrorPolicy.OPEN, StoreErrorPolicy.CLOSED])
async def test_redis_down_admits_or_refuses_as_configured_and_logs_once(
    policy: StoreErrorPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    rl = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", 10, 1000, on_store_error=policy)
    caplog.set_level(logging.ERROR, logger="gateway.ratelimit")
    try:
        results = [await rl.acquire("u", 5) for _ in range(20)]
        rl.settle("u", (1000, 5), 7)  # a correction that cannot be sent is logged, not raised
        await rl.flush()
    finally:
        await rl.close()
    expected = (None, None) if policy is StoreErrorPolicy.OPEN else (RateLimited("unavailable", 1), None)
    assert results == [expected] * 20
    lines = [r for r in caplog.records if r.name == "gateway.ratelimit"]
    assert len(lines) == 1
    assert "rate-limit Redis failed 1 time(s)" in lines[0].getMessage()
    assert "ConnectionError" in lines[0].getMessage()


@pytest.mark.parametrize("policy", [StoreErrorPolicy.OPEN, StoreErrorPolicy.CLOSED])
async def test_a_failing_database_admits_or_refuses_as_configured(
    policy: StoreErrorPolicy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(str(tmp_path / "unmigrated.db"))  # no rate_windows table: every admission fails
    await store.open()
    caplog.set_level(logging.ERROR, logger="gateway.ratelimit")
    try:
        rl = StoreRateLimiter(store, 10, None, policy)
        results = [await rl.acquire("u", 0) for _ in range(5)]
    finally:
        await store.close()
    expected = (None, None) if policy is StoreErrorPolicy.OPEN else (RateLimited("unavailable", 1), None)
    assert results == [expected] * 5
    (line,) = [r for r in caplog.records if r.name == "gateway.ratelimit"]
    assert "no such table: rate_windows" in line.getMessage()


async def test_a_silent_redis_delays_a_request_by_one_timeout_at_most() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        rl = RedisRateLimiter(url, 10, None, on_store_error=StoreErrorPolicy.CLOSED, timeout_seconds=0.2)
        try:
            started = time.monotonic()
            assert await rl.acquire("u", 0) == (RateLimited("unavailable", 1), None)
            assert time.monotonic() - started < 1.0  # one timeout, no retries
        finally:
            await rl.close()


async def test_more_users_at_once_than_redis_connections_wait_for_one(redis_backend: Make) -> None:
    # A take per user at a time, but many users at once: redis-py's pool (100 connections) refused the
    # rest with MaxConnectionsError, and a healthy Redis counted as failing (429 closed, uncounted open).
    rl: RedisRateLimiter = await redis_backend(10, None, policy=StoreErrorPolicy.CLOSED)
    results = await asyncio.gather(*(rl.acquire(f"user-{i}", 0) for i in range(300)))
    assert [refusal for refusal, _ in results] == [None] * 300


async def test_redis_recovering_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    prefix = f"test:rl:{secrets.token_hex(6)}:"
    rl = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", 1, None, key_prefix=prefix)
    caplog.set_level(logging.WARNING, logger="gateway.ratelimit")
    try:
        assert await admitted(rl) and await admitted(rl)  # down: open
        await rl.redis.aclose()
        # The same limiter, Redis back:
        rl.budget = rl.redis_budget = RedisBudget(Redis.from_url(REDIS_URL), prefix, 120)
        assert await admitted(rl)
        assert not await admitted(rl)
        assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    finally:
        await rl.redis.delete(prefix + "u")
        await rl.close()


def _worker(path: str, barrier: Any, results: Any) -> None:
    """One `--workers` process: its own store on the shared file, 10 parallel admissions at 10/min."""

    async def run() -> int:
        store = SqliteStore(path)
        await store.open()
        try:
            rl = StoreRateLimiter(store, 10, None)
            barrier.wait()
            outcomes = await asyncio.gather(*(rl.acquire("mp", 0) for _ in range(10)))
            return sum(refusal is None for refusal, _ in outcomes)
        finally:
            await store.close()

    results.put(asyncio.run(run()))


async def _migrated(path: str) -> None:
    store = SqliteStore(path)
    await store.open()
    await store.migrate()
    await store.close()


def test_three_real_processes_on_one_sqlite_file_admit_exactly_ten(tmp_path: Path) -> None:
    # Synchronous, so no event loop runs here when the workers fork.
    path = str(tmp_path / "workers.db")
    asyncio.run(_migrated(path))
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    try:
        admitted = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert sum(admitted) == 10


def _settings(**env: Any) -> Settings:
    return Settings(file=FileConfig(rate_limit=RateLimitConfig(10, None)), **env)


async def test_the_factory_chooses_redis_then_the_store_when_shared_then_memory(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "f.db"))
    redis = make_limiter(_settings(redis_url=REDIS_URL), store, shared=False)
    assert isinstance(redis, RedisRateLimiter)
    await redis.close()
    assert isinstance(make_limiter(_settings(), store, shared=True), StoreRateLimiter)
    assert isinstance(make_limiter(_settings(), store, shared=False), RateLimiter)
    unlimited = Settings(file=FileConfig(rate_limit=RateLimitConfig(None, None)), redis_url=REDIS_URL)
    assert isinstance(make_limiter(unlimited, store, shared=True), RateLimiter)  # nothing to share


async def test_portal_sessions_are_limited_in_the_shared_backend_across_processes(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "p.db"))
    # Request limits off: the portal keeps its own budget (5 a minute by default).
    settings = Settings(file=FileConfig(rate_limit=RateLimitConfig(None, None)), redis_url=REDIS_URL)
    first, second = (make_portal_limiter(settings, store, shared=True) for _ in range(2))  # two processes
    try:
        assert isinstance(first, RedisRateLimiter) and (first.rpm, first.tpm) == (5, None)
        user = PORTAL_KEY + secrets.token_hex(6)
        answers = [await (first if n % 2 else second).acquire(user, 0) for n in range(7)]
        assert [refusal is None for refusal, _ in answers] == [True] * 5 + [False] * 2
    finally:
        await first.close()
        await second.close()
    local = Settings(file=FileConfig(rate_limit=RateLimitConfig(portal_sessions_per_minute=2)))
    db = make_portal_limiter(local, store, shared=True)
    assert isinstance(db, StoreRateLimiter) and (db.rpm, db.tpm) == (2, None)
    memory = make_portal_limiter(local, store, shared=False)
    assert isinstance(memory, RateLimiter) and (memory.rpm, memory.tpm) == (2, None)
    with pytest.raises(ConfigError, match="portal_sessions_per_minute must be at least 1"):
        parse_file_config({"rate_limit": {"portal_sessions_per_minute": 0}})


def test_on_store_error_is_read_from_the_config_file_and_validated() -> None:
    assert parse_file_config({}).rate_limit.on_store_error is StoreErrorPolicy.OPEN
    closed = parse_file_config({"rate_limit": {"on_store_error": "closed"}}).rate_limit
    assert closed.on_store_error is StoreErrorPolicy.CLOSED and closed.requests_per_minute == 60
    with pytest.raises(ConfigError, match=r"\[rate_limit\] on_store_error must be one of 'open', 'closed', got 'shut'"):
        parse_file_config({"rate_limit": {"on_store_error": "shut"}})
    with pytest.raises(ConfigError, match="on_store_error must be one of"):
        parse_file_config({"rate_limit": {"on_store_error": 1}})


def test_redis_url_comes_from_the_environment_and_is_checked() -> None:
    env = {"GATEWAY_REDIS_URL": "redis://:s3cret@cache:6379/2"}
    assert settings_from_env(env, load_file=False).redis_url == "redis://:s3cret@cache:6379/2"
    assert settings_from_env({}, load_file=False).redis_url == ""
    with pytest.raises(ConfigError) as err:
        settings_from_env({"GATEWAY_REDIS_URL": "http://:s3cret@cache:6379"}, load_file=False)
    assert "GATEWAY_REDIS_URL must look like redis://" in str(err.value) and "s3cret" not in str(err.value)


async def test_zero_requests_per_minute_refuses_everything_shared(backend: Make) -> None:
    rl = await backend(0, None, Clock(1000.0))
    assert await rl.acquire("u", 0) == (RateLimited("requests", 60), None)


async def test_a_request_that_needs_no_tokens_is_not_refused_for_tokens_shared(backend: Make) -> None:
    rl = await backend(60, 100, Clock(1000.0))
    assert (await rl.acquire("u", 500))[0] is None  # a lone over-sized request passes
    assert (await rl.acquire("u", 0))[0] is None
    assert await rl.acquire("u", 1) == (RateLimited("tokens", 60), None)


async def test_two_processes_correcting_the_same_users_in_opposite_orders_never_deadlock(tmp_path: Path) -> None:
    # Each process's corrections go in one transaction: rows locked in opposite orders deadlocked, and
    # PostgreSQL rolled one batch back, its corrections (hand-backs, actual tokens) lost.
    async with shared_backend("postgres", tmp_path) as make:
        a, b, holder = [await make(None, 1000, Clock(1000.5)) for _ in range(3)]
        pool = holder.budget.pool  # type: ignore[attr-defined]
        await pool.execute("INSERT INTO rate_windows VALUES ('x', 1000, 1, 10), ('y', 1000, 1, 10)")
        pool_db = await pool.fetchval("SELECT current_database()")

        def waiting(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = $1"
                return await pool.fetchval(sql, pool_db) == n

            return check

        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE rate_windows SET tokens = tokens WHERE user_id = 'x'")  # lines the batches up
            a.settle("x", (1000, 10), 11)
            a.settle("y", (1000, 10), 11)
            await wait_until_async(waiting(1))  # a waits for x
            b.settle("y", (1000, 10), 11)
            b.settle("x", (1000, 10), 11)
            await wait_until_async(waiting(2))  # b waits for x too, holding y unless it goes in a's order
        await a.flush()
        await b.flush()
        rows = await pool.fetch("SELECT user_id, tokens FROM rate_windows ORDER BY user_id")
        assert [(r[0], r[1]) for r in rows] == [("x", 12), ("y", 12)]


@pytest.mark.parametrize("loser", ["correction", "sweep"])
async def test_the_sweep_and_a_correction_batch_on_the_same_expired_rows_never_deadlock(
    tmp_path: Path, loser: str
) -> None:
    # A batch locks its rows by (second, user): a, b, z; the sweep deleted the expired ones in the
    # table's order: b (written first), a. Lined up on b, the sweep got b and waited for a, the batch
    # held a and waited for b, and PostgreSQL aborted the side whose deadlock_timeout ran out first
    # (each side's picks the loser here): the whole batch (z's correction, a live window's, lost: tokens
    # per minute miscounted), or the sweep (an error logged, the rows left for the next one).
    quick, slow = {"deadlock_timeout": "200ms"}, {"deadlock_timeout": "30s"}
    async with shared_backend("postgres", tmp_path) as make:
        corrector = await make(
            None, 1000, pg_settings={"application_name": "corrector", **(quick if loser == "correction" else slow)}
        )
        sweeper = await make(
            None, 1000, pg_settings={"application_name": "sweeper", **(quick if loser == "sweep" else slow)}
        )
        pool = (await make(None, 1000)).budget.pool
        await pool.execute(
            "INSERT INTO rate_windows VALUES ('b', 1000, 1, 10), ('a', 1000, 1, 10), ('z', 1099, 5, 500)"
        )
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("UPDATE rate_windows SET tokens = tokens WHERE user_id = 'b'")  # lines the two up on b
            sweep = asyncio.create_task(sweeper.budget.rate_sweep(1100.0))
            await wait_until_async(lock_waiting(pool, "sweeper", sweep))  # first in line for b
            corrections = [("z", 1099, -2, -200), ("b", 1000, 0, 5), ("a", 1000, 0, 5)]
            correct = asyncio.create_task(corrector.budget.rate_correct(corrections))
            await wait_until_async(lock_waiting(pool, "corrector", correct))  # holding a, after the sweep for b
        outcomes = await asyncio.gather(sweep, correct, return_exceptions=True)
        assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
        await sweeper.budget.rate_sweep(1100.0)  # (what the first one skipped: b)
        rows = await pool.fetch("SELECT user_id, second, requests, tokens FROM rate_windows")
        assert [tuple(r) for r in rows] == [("z", 1099, 3, 300)]
