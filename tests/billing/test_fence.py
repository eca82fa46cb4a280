"""The lease fence and the heartbeat behind it: a process spends its leases only while no other
can have taken it for dead, whatever paused it (a suspended machine, a long recovery)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest

from gateway.billing import leases
from gateway.billing.leases import LeasesLapsed
from gateway.billing.protocols import Reservation
from gateway.timeutil import iso, parse_iso
from tests.conftest import wait_until_async
from tests.support_leases import Cluster, Proc

OUT = "claude_output_tokens"
HAND = {"stale": 10.0, "poll": 3600.0, "heartbeat": 3600.0}  # keepers driven by hand


class SuspendableClock:
    """A fence clock on a machine that can be suspended: `suspend` moves it on, as CLOCK_BOOTTIME
    does, while the process runs nothing (and `time.monotonic` stands still)."""

    def __init__(self) -> None:
        self.slept = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.slept

    def suspend(self, seconds: float) -> None:
        self.slept += seconds


async def _suspend(shared: Cluster, r: Proc, clock: SuspendableClock, seconds: float) -> None:
    """r's machine sleeps `seconds`: its fence clock moves on, and so does the database's (r's
    last heartbeat is that much older), while r runs nothing."""
    clock.suspend(seconds)
    (row,) = await shared.query("SELECT heartbeat_at FROM processes WHERE owner = ?", r.owner)
    at = row[0] if shared.kind == "postgres" else parse_iso(row[0])
    earlier = at - timedelta(seconds=seconds)
    await shared.query(
        "UPDATE processes SET heartbeat_at = ? WHERE owner = ?",
        earlier if shared.kind == "postgres" else iso(earlier),
        r.owner,
    )


async def test_a_process_resumed_after_a_suspend_spends_no_lease_released_meanwhile(shared: Cluster) -> None:
    # r's machine is suspended for longer than the stale age: the others take r for dead and its
    # leases go to them. Resumed, r must not reserve from the idle slice it still holds in memory
    # before a heartbeat goes through again (on CLOCK_MONOTONIC its fence had not moved: it did).
    clock = SuspendableClock()
    a = await shared.process("a", {OUT: 1000}, host="here", **HAND)
    r = await shared.process("r", {OUT: 1000}, host="elsewhere", fence_clock=clock, **HAND)
    assert isinstance(await r.ledger.reserve("u", {OUT: 40}), Reservation)  # in flight
    assert await shared.leases("u") == {r.owner: 250}  # 210 of it idle
    await _suspend(shared, r, clock, 60.0)
    await a.keeper.beat()
    assert await a.keeper.settle_dead() == [r.owner]
    assert isinstance(await a.ledger.reserve("u", {OUT: 960}), Reservation)
    # Resumed, before r's keeper beats again: r's idle 210 are a's now.
    assert r.ledger.reserve_held("u", {OUT: 200}) is None
    with pytest.raises(LeasesLapsed):
        await r.ledger.reserve("u", {OUT: 200})


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="CLOCK_BOOTTIME is Linux's")
def test_the_fence_runs_on_a_clock_that_counts_suspended_time() -> None:
    assert leases.fence_clock.func is time.clock_gettime  # type: ignore[attr-defined]
    assert leases.fence_clock.args == (time.CLOCK_BOOTTIME,)  # type: ignore[attr-defined]


async def test_a_recovery_longer_than_the_stale_age_does_not_stop_the_heartbeats(shared: Cluster) -> None:
    # a settles a dead process d whose journal takes long to store (a backlog of hours): three
    # stale ages here. a's heartbeats must go on meanwhile, or a's fence lapses (its billed
    # requests get 503) and a process on another host takes a, alive, for dead.
    a = await shared.process("a", {OUT: 1000}, journal=True, stale=0.5, heartbeat=0.05)
    b = await shared.process("b", {OUT: 1000}, host="elsewhere", **{**HAND, "stale": 0.5})
    d = await shared.process("d", {OUT: 1000}, journal=True, stale=0.5, heartbeat=0.05)
    assert isinstance(await d.ledger.reserve("u", {OUT: 40}), Reservation)
    assert isinstance(await a.ledger.reserve("u", {OUT: 40}), Reservation)
    recovering, done = asyncio.Event(), asyncio.Event()
    recover = a.keeper.recover
    assert recover is not None

    async def slow(directory: Path) -> object:
        recovering.set()
        await done.wait()
        return await recover(directory)

    a.keeper.recover = slow
    await d.kill()
    await asyncio.wait_for(recovering.wait(), 5)
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        assert a.ledger.reserve_held("u", {OUT: 1}) is not None, "a's fence lapsed while it recovered d"
        await b.keeper.beat()
        assert a.owner not in await b.keeper.settle_dead()
        await asyncio.sleep(0.05)
    done.set()
    await wait_until_async(lambda: _released(shared, d.owner))
    assert a.owner in await shared.leases("u")


async def _released(shared: Cluster, owner: str) -> bool:
    return not await shared.query("SELECT owner FROM processes WHERE owner = ?", owner)
