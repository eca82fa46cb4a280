"""Replicas on machines whose clocks disagree, sharing one database.

A host without NTP runs seconds (or minutes) off. Whatever one process stamps and another
compares (heartbeats, sync claims, the invalidation log) must be measured on ONE clock, the
database's: a live replica running behind must not be taken for dead (its leases released and
granted twice, its requests settled by estimate), a sync claim must not be taken over while its
owner still sends it, and a dead replica must still be released after the stale age.

A "host" here is the code of this test process reading a clock `offset` seconds off the true one
(`host_clock`) while it acts; the database's clock is the true one. Processes are created with
their keepers idle (`poll`/`heartbeat` of an hour) and driven by hand, so each step runs on the
clock the test says. On SQLite every process runs on one host, so skew cannot arise there: those
tests run on PostgreSQL only; the one without skew runs on both.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from gateway import timeutil
from gateway.billing.protocols import Reservation
from gateway.quota import Refusal
from gateway.store.leases_base import InvalidationKind
from tests.conftest import wait_until_async
from tests.support_leases import Cluster, Proc, cluster, record

OUT = "claude_output_tokens"
STALE = 1.0  # GATEWAY_HEARTBEAT_STALE_SECONDS of every process here
IDLE = {"poll": 3600.0, "heartbeat": 3600.0}  # keepers driven by hand

# Every module that reads the clock for a time another process compares (its `utcnow` name).
_CLOCK_READERS = (
    "gateway.billing.keeper",
    "gateway.billing.leases",
    "gateway.store.postgres_leases",
    "gateway.store.postgres_outbox",
    "gateway.store.sqlite_leases",
    "gateway.store.sqlite_outbox",
    "gateway.polar.sync",
)


@contextlib.contextmanager
def host_clock(offset: float) -> Iterator[None]:
    """Within the block, this process's code reads a clock `offset` seconds off the true time."""
    real = timeutil.utcnow

    def skewed() -> datetime:
        return real() + timedelta(seconds=offset)

    with pytest.MonkeyPatch.context() as mp:
        for name in _CLOCK_READERS:
            module = importlib.import_module(name)
            if hasattr(module, "utcnow"):
                mp.setattr(module, "utcnow", skewed)
        yield


@pytest.fixture(params=["sqlite", "postgres"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(request.param, tmp_path) as c:
        yield c


def _skew_needs_two_hosts(shared: Cluster) -> None:
    if shared.kind == "sqlite":
        pytest.skip("SQLite's processes share one host and so one clock: no skew between them")


async def _process(shared: Cluster, name: str, **kwargs: object) -> Proc:
    return await shared.process(name, {OUT: 100}, stale=STALE, **IDLE, **kwargs)  # type: ignore[arg-type]


async def _settled(keeper_of: Proc, owner: str) -> bool:
    await keeper_of.keeper.beat()  # (a live process beats first in each round, as its keeper does)
    return owner in await keeper_of.keeper.settle_dead()


async def test_a_live_replica_whose_clock_is_behind_is_not_taken_for_dead(shared: Cluster) -> None:
    _skew_needs_two_hosts(shared)
    b = await shared.process("b", {OUT: 100}, stale=STALE, poll=0.02, heartbeat=3600.0, recall_wait=0.2)
    with host_clock(-(STALE + 5)):
        a = await _process(shared, "a", host="elsewhere")
        assert isinstance(await a.ledger.reserve("u", {OUT: 30}), Reservation)
        assert await a.store.heartbeat(a.owner) is True
    assert await b.keeper.settle_dead() == []
    assert await shared.leases("u") == {a.owner: 30}
    # b may not have a's balance: a is live and holds it (its recall goes unanswered: refused).
    assert isinstance(await b.ledger.reserve("u", {OUT: 71}), Refusal)
    assert await shared.leases("u") == {a.owner: 30}
    with host_clock(-(STALE + 5)):
        assert await a.store.heartbeat(a.owner) is True  # still registered: not taken for dead


async def test_a_dead_replica_whose_clock_ran_ahead_is_released_after_the_stale_age(shared: Cluster) -> None:
    _skew_needs_two_hosts(shared)
    b = await _process(shared, "b")
    with host_clock(+15.0):
        d = await _process(shared, "d", host="elsewhere")
        assert isinstance(await d.ledger.reserve("u", {OUT: 30}), Reservation)
        assert await d.store.heartbeat(d.owner) is True
    await d.kill()
    # The stale age on the database's clock, not that plus the 15 s its host ran ahead.
    await wait_until_async(lambda: _settled(b, d.owner), within=STALE + 4, interval=0.05)
    assert await shared.leases("u") == {}
    assert isinstance(await b.ledger.reserve("u", {OUT: 100}), Reservation)


async def test_a_replica_whose_clock_is_behind_still_releases_a_dead_one(shared: Cluster) -> None:
    _skew_needs_two_hosts(shared)
    d = await _process(shared, "d", host="elsewhere")
    assert isinstance(await d.ledger.reserve("u", {OUT: 30}), Reservation)
    with host_clock(-15.0):
        b = await _process(shared, "b")
    await d.kill()

    async def settled_by_b() -> bool:
        with host_clock(-15.0):
            return await _settled(b, d.owner)

    await wait_until_async(settled_by_b, within=STALE + 4, interval=0.05)
    assert await shared.leases("u") == {}


async def test_a_replica_silent_for_longer_than_the_stale_age_is_reported_and_claimed_once(shared: Cluster) -> None:
    b = await _process(shared, "b")
    d = await _process(shared, "d", host="elsewhere")
    assert isinstance(await d.ledger.reserve("u", {OUT: 30}), Reservation)
    assert await b.store.stale_processes(b.owner, 60.0) == []  # beat just now
    await d.kill()
    rows = await wait_until_async(lambda: b.store.stale_processes(b.owner, STALE), within=STALE + 4, interval=0.05)
    assert [(r.owner, r.host) for r in rows] == [(d.owner, "elsewhere")]
    assert await b.store.claim_process(d.owner, STALE) is not None
    assert await b.store.claim_process(d.owner, 60.0) is None  # the claim renewed it: one settles it at a time
    assert await b.store.stale_processes(b.owner, 60.0) == []
    # Should the claimer die too, its claim goes stale in turn and the next round settles it.
    await wait_until_async(lambda: _settled(b, d.owner), within=STALE + 4, interval=0.05)
    assert await shared.leases("u") == {}


async def test_a_sync_claim_by_a_host_running_behind_is_not_taken_over_while_it_lasts(shared: Cluster) -> None:
    _skew_needs_two_hosts(shared)
    a, b = await shared.store(), await shared.store()
    try:
        await a.finish_requests([record("r1", "u", "o", {}, {OUT: 5})])
        with host_clock(-15.0):
            mine = await a.claim_events("a", 10, 10.0)
        assert [e.request_id for e in mine] == ["r1"]
        assert await b.claim_events("b", 10, 10.0) == []  # a still has 10 s to send it
        assert await b.claim_events("b", 10, 10.0, due_only=False) == []
    finally:
        await a.close()
        await b.close()


async def test_a_sync_claim_by_a_host_running_ahead_expires_on_the_database_clock(shared: Cluster) -> None:
    _skew_needs_two_hosts(shared)
    a, b = await shared.store(), await shared.store()
    try:
        await a.finish_requests([record("r1", "u", "o", {}, {OUT: 5})])
        with host_clock(+15.0):
            mine = await a.claim_events("a", 10, 0.5)
        assert [e.request_id for e in mine] == ["r1"]
        taken = await wait_until_async(lambda: b.claim_events("b", 10, 60.0), within=4.0, interval=0.05)
        assert [e.request_id for e in taken] == ["r1"]  # a stopped: b sends it half a second on, not 15
    finally:
        await a.close()
        await b.close()


async def test_a_late_log_entry_from_a_host_running_behind_is_still_read(shared: Cluster) -> None:
    _skew_needs_two_hosts(shared)
    a = await _process(shared, "a")
    other = await shared.store()
    try:
        with host_clock(-15.0):
            seq = await other.notify_invalidation(InvalidationKind.KEY, "key-1")
    finally:
        await other.close()
    a.keeper._seq = seq  # a read a later entry first: only the look-back window finds this one
    a.keeper._next_beat = 0.0  # (the next round reads the log)
    await a.keeper.tick()
    assert [(i.kind, i.subject) for i in a.invalidations] == [("key", "key-1")]


async def test_a_host_running_ahead_does_not_prune_the_log_early(shared: Cluster) -> None:
    _skew_needs_two_hosts(shared)
    a = await _process(shared, "a")
    await a.store.notify_invalidation(InvalidationKind.KEY, "key-1")
    with host_clock(+11 * 60.0):  # past the 10 minutes the log is kept
        a.keeper._next_prune = 0.0
        await a.keeper.tick()
    assert await shared.query("SELECT kind, subject FROM invalidations") == [("key", "key-1")]
