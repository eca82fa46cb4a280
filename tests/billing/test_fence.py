"""The lease fence and the heartbeat behind it: a process spends its leases only while no other
can have taken it for dead, whatever paused it (a suspended machine, a long recovery)."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from gateway.billing import leases
from gateway.billing.leases import LeasesLapsed
from gateway.billing.protocols import Reservation
from gateway.timeutil import iso, parse_iso
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
