"""The shared quota ledger when limits change under a request, a hand-back fails, or a recall is
reused: consumed never exceeds credited and no refusal is false."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.billing.leases import LeasesLapsed
from gateway.billing.protocols import Reservation
from gateway.quota import Refusal
from gateway.store.leases_base import InvalidationKind
from tests.conftest import poll_until, wait_until_async
from tests.support_leases import Cluster, CutOff, Proc, cluster, record

OUT = "claude_output_tokens"


async def test_a_request_begun_while_its_meter_was_unlimited_frees_no_lease_when_it_settles(shared: Cluster) -> None:
    # Limits change by webhook while a request is in flight: limited -> unlimited -> limited again.
    # Its reservation took nothing from a lease, so its settle must give nothing back.
    await shared.put_credit("u", {OUT: 100})
    a = await shared.process("a", {})
    b = await shared.process("b", {})
    first = await a.ledger.reserve("u", {OUT: 10})
    assert isinstance(first, Reservation)
    a.ledger.settle(first, {})
    await shared.put_credit("u", {OUT: None})
    a.ledger.invalidate("u")
    during = await a.ledger.reserve("u", {OUT: 50})
    assert isinstance(during, Reservation)
    await shared.put_credit("u", {OUT: 100})
    a.ledger.invalidate("u")
    small = await a.ledger.reserve("u", {OUT: 1})
    assert isinstance(small, Reservation)
    a.ledger.settle(during, {})
    granted = 1  # `small`, still in flight
    for p in (a, b, a, b):
        while isinstance(await p.ledger.reserve("u", {OUT: 10}), Reservation):
            granted += 10
    assert granted == 91  # 1 + 9 x 10 of the 100 credited; it was 141 when `during` gave back 50


async def test_a_hand_back_the_store_failed_is_set_right_at_the_next_round(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 100})
    b = await shared.process("b", {OUT: 100})
    res = await a.ledger.reserve("u", {OUT: 10})
    assert isinstance(res, Reservation)
    a.ledger.settle(res, {})  # nothing used: a holds an idle slice
    await _strand_a_hand_back(a)  # the keeper's idle round, failing once
    assert a.ledger._users["u"].held[OUT].lease == 0  # never more than the store may say
    await a.ledger.keep(30.0, scan=False)  # the next keeper round (its own may come first: the same)
    assert await shared.leases("u") == {a.owner: 0}
    # Nothing is reserved or consumed anywhere: once a's keeper sets its row to what it holds (0),
    # b gets the whole credit. Before, the slice stayed in a's row until a stopped: a false 402.
    got = await b.ledger.reserve("u", {OUT: 100})
    assert isinstance(got, Reservation), (got, await shared.leases("u"))


async def _reserve_while_b_answers(a: Proc, b: Proc, amount: int) -> Reservation | Refusal:
    """a reserves; once it has issued a recall, b's keeper answers it (b ticks by hand)."""
    recalls = set(a.ledger.my_recalls)
    task = asyncio.ensure_future(a.ledger.reserve("u", {OUT: amount}))
    deadline = time.monotonic() + 10
    while not task.done() and a.ledger.my_recalls == recalls:
        assert time.monotonic() < deadline, "no recall issued"
        await asyncio.sleep(0.005)
    if not task.done():
        await b.keeper.tick()
    return await task


async def test_a_recall_reused_after_everyone_answered_it_is_issued_again(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 100})
    b = await shared.process("b", {OUT: 100}, poll=3600.0, heartbeat=3600.0)
    held = await b.ledger.reserve("u", {OUT: 50})
    assert isinstance(held, Reservation)
    # b's 50 are reserved: it answers the recall with nothing, and 60 do not fit. Right.
    assert await _reserve_while_b_answers(a, b, 60) == Refusal(meter=OUT, needed=60, remaining=50)
    b.ledger.settle(held, {})  # b's request used nothing: its 50 are idle now, after it answered
    # Within the first recall's wait: reusing it (everyone answered) refused at once, with b's idle
    # 50 never asked for.
    second = await _reserve_while_b_answers(a, b, 60)
    assert isinstance(second, Reservation), (second, await shared.leases("u"))


async def test_a_process_back_from_the_dead_rereads_limits_whose_log_entry_was_pruned(shared: Cluster) -> None:
    """A process frozen longer than the log is kept (10 min) is taken for dead, and the entries
    written meanwhile are pruned before it reads them: coming back it must not go on granting
    from a credit that changed while it was away."""
    await shared.put_credit("u", {OUT: 100})
    a = await shared.process("a", {}, heartbeat=0.05)
    assert isinstance(await a.ledger.reserve("u", {OUT: 10}), Reservation)  # credit 100 cached
    task = a.keeper._task
    assert task is not None
    task.cancel()  # frozen (SIGSTOP, a suspended VM): no heartbeat, no log read
    a.keeper._task = None

    other = await shared.store()
    try:
        await shared.put_credit("u", {OUT: 5})
        await other.notify_invalidation(InvalidationKind.LIMITS, "u")
        await other.release_owner(a.owner)  # taken for dead by a live process (its heartbeat expired)
        # Ten minutes on, a live keeper prunes the log as it does every minute.
        await other.prune_invalidations(-1.0)  # (everything, and a second to spare)
    finally:
        await other.close()

    a.keeper._next_beat = 0.0  # a wakes up: its next round beats, finds itself taken for dead
    await a.keeper.tick()
    assert len(await shared.query("SELECT owner FROM processes WHERE owner = ?", a.owner)) == 1  # re-registered
    # The credit is 5 now, 10 already reserved: nothing more may be granted.
    assert isinstance(await a.ledger.reserve("u", {OUT: 10}), Refusal)


async def _strand_a_hand_back(a: Any) -> None:
    """a's hand-back fails once: a is left for the keeper's `_resync`."""
    real = a.store.return_lease
    calls = 0

    async def fails_once(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("store unreachable for a moment")
        await real(*args, **kwargs)

    a.store.return_lease = fails_once
    with pytest.raises(ConnectionError):
        await a.ledger.return_idle(a.ledger._users["u"])
    assert a.ledger._unsynced


async def test_a_resync_racing_a_stored_batch_is_set_right_at_the_next_round(shared: Cluster) -> None:
    """A batch of a's usage commits (the row goes down by it) and the keeper's `_resync` runs
    before the recorder calls `stored`: the row is set back up by it; `stored` asks for another
    resync, or b would be refused what is free until a stops."""
    await shared.put_credit("u", {OUT: 100})
    a = await shared.process("a", {}, poll=3600.0, heartbeat=3600.0)
    b = await shared.process("b", {}, poll=3600.0, heartbeat=3600.0)
    a.ledger.poll = b.ledger.poll = 0.02  # (the keepers tick only by hand)
    r = await a.ledger.reserve("u", {OUT: 10})
    assert isinstance(r, Reservation)
    a.ledger.settle(r, {OUT: 10})  # used 10: unstored until the recorder stores it
    await _strand_a_hand_back(a)  # a: lease 10 (covers the unstored), the idle rest failed to go back
    rec = record("r1", "u", a.owner, {OUT: 10}, {OUT: 10})
    await a.store.finish_requests([rec])  # the batch commits ...
    await a.ledger.keep(30.0, scan=False)  # ... the keeper round runs before the recorder resumes ...
    a.ledger.stored([rec])  # ... which then tells the ledger
    h = a.ledger._users["u"].held[OUT]
    assert (h.lease, h.reserved, h.unstored) == (0, 0, 0)
    await a.ledger.keep(30.0, scan=True)  # later rounds change nothing
    # 10 consumed, nothing in flight anywhere: 90 are free.
    got = await b.ledger.reserve("u", {OUT: 90})
    assert isinstance(got, Reservation), (got, await shared.leases("u"))


async def test_a_reservation_that_waited_past_the_fence_is_not_granted_from_released_leases(shared: Cluster) -> None:
    """r's heartbeats stop reaching the database (a partition, a pause) while one of its requests
    waits on the store (here: the reload of limits a webhook changed). The request passed the fence
    before it waited; by the time the store answers, r has been taken for dead and its leases are
    someone else's. Granting it from r's idle slice then spends credit twice."""
    a = await shared.process("a", {OUT: 1000}, host="here", stale=0.5, heartbeat=0.05)
    r = await shared.process("r", {OUT: 1000}, host="elsewhere", stale=0.5, heartbeat=0.05)
    assert isinstance(await r.ledger.reserve("u", {OUT: 40}), Reservation)  # in flight
    assert await shared.leases("u") == {r.owner: 250}  # 210 of it idle
    beats, limits = CutOff(r.store), CutOff(r.store)
    r.keeper.store, r.ledger.store = beats, limits  # type: ignore[assignment]
    beats.cut()
    limits.cut()
    r.ledger.invalidate("u")  # the limits changed (the same credit): the next pre-check reloads them
    waiting = asyncio.ensure_future(r.ledger.reserve("u", {OUT: 200}))
    await asyncio.sleep(0)  # (it starts: before the fence, it goes on to reload the limits)
    assert not waiting.done() and r.ledger.fence_clock() < r.ledger._fence

    async def released() -> bool:
        return not await shared.query("SELECT owner FROM quota_leases WHERE owner = ?", r.owner)

    await wait_until_async(released)
    assert isinstance(await a.ledger.reserve("u", {OUT: 960}), Reservation)  # r's idle 210 went to a
    limits.open.set()  # the reload comes back: r's request must not be granted from a lease it lost
    with pytest.raises(LeasesLapsed):
        await waiting


class _CountTakes:
    """The ledger's lease store, counting the takes that came back."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.takes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def take_lease(self, take: Any) -> Any:
        out = await self.inner.take_lease(take)
        self.takes += 1
        return out


async def test_a_hand_back_still_on_its_way_is_no_reason_to_refuse(tmp_path: Path) -> None:
    """The keeper hands a's idle slice back (a quiet user) while a request of the same user needs
    it: the hand-back has left a's books but the database has not committed it yet (another
    connection of the pool; the row is busy). The take then sees the slice as a's lease still,
    and nobody else holds anything: a refusal would be false."""
    async with cluster("postgres", tmp_path) as shared:
        a = await shared.process("a", {OUT: 100}, poll=3600.0, heartbeat=3600.0)
        a.ledger.poll = 0.02  # (the keeper's rounds by hand)
        first = await a.ledger.reserve("u", {OUT: 10})
        assert isinstance(first, Reservation)
        a.ledger.settle(first, {})  # nothing used: a holds an idle slice of 25
        assert await shared.leases("u") == {a.owner: 25}
        takes = _CountTakes(a.ledger.leases)
        a.ledger.leases = takes  # type: ignore[assignment]
        busy = await asyncpg.connect(shared.dsn)
        try:
            tx = busy.transaction()
            await tx.start()
            await busy.execute("SELECT 1 FROM quota_leases WHERE owner = $1 FOR UPDATE", a.owner)
            back = asyncio.ensure_future(a.ledger.keep(0.0, scan=True))  # the idle round: 25 go back
            await poll_until(lambda: a.ledger._users["u"].held[OUT].lease == 0)
            wanted = asyncio.ensure_future(a.ledger.reserve("u", {OUT: 100}))
            await poll_until(lambda: takes.takes >= 1)  # it asked while the hand-back was held up
            await tx.rollback()
        finally:
            await busy.close()
        await back
        got = await wanted
        assert isinstance(got, Reservation), (got, await shared.leases("u"))
        assert await shared.leases("u") == {a.owner: 100}


async def test_usage_above_a_reservation_reaches_the_shared_balance_at_the_next_keeper_round(shared: Cluster) -> None:
    """A request used more than it reserved (a low estimate): the excess is consumed already, so it
    must count against the balance every process shares at once, not at the next idle scan (a
    heartbeat away). Meanwhile the stored usage left a's lease below zero, which others read as
    credit: they could be granted the excess a second time."""
    a = await shared.process("a", {OUT: 1000}, poll=3600.0, heartbeat=3600.0)  # rounds by hand
    b = await shared.process("b", {OUT: 1000}, poll=3600.0, heartbeat=3600.0)
    res = await a.ledger.reserve("u", {OUT: 100})
    assert isinstance(res, Reservation)
    assert await shared.leases("u") == {a.owner: 250}
    a.ledger.settle(res, {OUT: 400})  # 150 more than a's whole lease
    await a.keeper.tick()  # a poll round (no heartbeat due)
    assert await shared.leases("u") == {a.owner: 400}
    rec = record("r1", "u", a.owner, {OUT: 100}, {OUT: 400})
    await a.store.finish_requests([rec])
    a.ledger.stored([rec])
    assert await shared.leases("u") == {a.owner: 0}
    # 400 consumed of 1,000: 600 are left, not 750.
    assert await b.ledger.reserve("u", {OUT: 750}) == Refusal(meter=OUT, needed=750, remaining=600)
    assert isinstance(await b.ledger.reserve("u", {OUT: 600}), Reservation)


async def test_a_resync_does_not_run_under_a_hand_back_still_on_its_way(shared: Cluster) -> None:
    """A hand-back of a failed, so the keeper sets a's row to what a holds (`_resync`). Meanwhile a
    request's reload of limits hands a's new idle slice back, slowly: set first, that hand-back
    then takes the row below what a holds, and the difference is credit to others."""
    a = await shared.process("a", {OUT: 100}, poll=3600.0, heartbeat=3600.0)  # rounds by hand
    b = await shared.process("b", {OUT: 100}, poll=3600.0, heartbeat=3600.0)
    first = await a.ledger.reserve("u", {OUT: 10})
    assert isinstance(first, Reservation)
    a.ledger.settle(first, {})
    await _strand_a_hand_back(a)  # a holds 0 now; its row still says 25
    second = await a.ledger.reserve("u", {OUT: 10})  # a new slice: a quarter of the 75 unleased
    assert isinstance(second, Reservation)
    a.ledger.settle(second, {})
    assert (a.ledger._users["u"].held[OUT].lease, await shared.leases("u")) == (18, {a.owner: 43})
    real, gate = a.store.return_lease, asyncio.Event()

    async def slow(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await real(*args, **kwargs)

    a.store.return_lease = slow
    back = asyncio.ensure_future(a.ledger.return_idle(a.ledger._users["u"]))  # as a limits reload does
    await poll_until(lambda: a.ledger._users["u"].held[OUT].lease == 0)
    await a.ledger.keep(30.0, scan=False)  # the keeper's round while the 18 are on their way
    gate.set()
    await back
    await a.ledger.keep(30.0, scan=False)
    assert await shared.leases("u") == {a.owner: 0}
    # Nothing is reserved or consumed: b gets the 100 and not one more.
    assert isinstance(await b.ledger.reserve("u", {OUT: 100}), Reservation)
    assert await b.ledger.reserve("u", {OUT: 1}) == Refusal(meter=OUT, needed=1, remaining=0)


async def test_a_recall_answered_while_a_hand_back_is_on_its_way_is_no_reason_to_refuse(shared: Cluster) -> None:
    """b hands its idle slice back (a limits reload on its request path) and the statement is slow
    to reach the store. Meanwhile a recalls the user and b's keeper answers: committed before the
    hand-back lands, the answer tells a that b has given back all it will, while the store still
    counts the slice as b's. Nothing is reserved anywhere: a refusal would be false."""
    a = await shared.process("a", {OUT: 100}, poll=3600.0, heartbeat=3600.0, recall_wait=5.0)  # rounds by hand
    b = await shared.process("b", {OUT: 100}, poll=3600.0, heartbeat=3600.0)
    a.ledger.poll = 0.02
    first = await b.ledger.reserve("u", {OUT: 10})
    assert isinstance(first, Reservation)
    b.ledger.settle(first, {})  # nothing used: b holds an idle slice of 25
    assert await shared.leases("u") == {b.owner: 25}
    real, gate, calls = b.store.return_lease, asyncio.Event(), 0

    async def first_slow(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        await real(*args, **kwargs)

    b.store.return_lease = first_slow
    back = asyncio.ensure_future(b.ledger.return_idle(b.ledger._users["u"]))  # as a limits reload does
    await poll_until(lambda: b.ledger._users["u"].held[OUT].lease == 0)
    takes = _CountTakes(a.ledger.leases)
    a.ledger.leases = takes  # type: ignore[assignment]
    wanted = asyncio.ensure_future(a.ledger.reserve("u", {OUT: 100}))
    await poll_until(lambda: wanted.done() or a.ledger.my_recalls)
    await b.keeper.tick()  # b reads the recall and answers it, the hand-back still on its way
    seen = takes.takes
    await poll_until(lambda: wanted.done() or takes.takes >= seen + 2)  # a asked again since
    gate.set()
    await back
    await b.keeper.tick()
    got = await wanted
    assert isinstance(got, Reservation), (got, await shared.leases("u"))
    assert await shared.leases("u") == {a.owner: 100, b.owner: 0}


async def test_usage_settled_while_its_meter_was_unlimited_frees_no_lease_when_stored(shared: Cluster) -> None:
    """A request settles while its meter is unlimited (no lease covers it), the meter becomes
    limited, a takes a slice, and only then is the request stored: the store takes its usage off
    a's row. a must not count that usage as leaving what it has settled here (it never counted
    it): it would believe it holds that much more idle credit than its row does."""
    await shared.put_credit("u", {OUT: None})
    a = await shared.process("a", {}, poll=3600.0, heartbeat=3600.0)  # rounds by hand
    b = await shared.process("b", {}, poll=3600.0, heartbeat=3600.0, recall_wait=0.3)
    a.ledger.poll = b.ledger.poll = 0.02
    free = await a.ledger.reserve("u", {OUT: 50})
    assert isinstance(free, Reservation)
    a.ledger.settle(free, {OUT: 50})  # used 50 while unlimited
    await shared.put_credit("u", {OUT: 1000})
    a.ledger.invalidate("u")
    small = await a.ledger.reserve("u", {OUT: 10})  # a's first slice: a quarter of the 1000
    assert isinstance(small, Reservation)
    a.ledger.settle(small, {})
    assert await shared.leases("u") == {a.owner: 250}
    rec = record("r1", "u", a.owner, {}, {OUT: 50})
    await a.store.finish_requests([rec])
    a.ledger.stored([rec])
    assert await shared.leases("u") == {a.owner: 200}  # the stored 50 left a's row
    granted = 0
    for p in (a, b, a, b):
        while isinstance(await p.ledger.reserve("u", {OUT: 10}), Reservation):
            granted += 10
    assert granted == 950  # 1000 credited, 50 consumed; it was 1000


async def test_usage_settled_while_unlimited_that_takes_a_row_below_zero_is_covered_at_the_next_round(
    shared: Cluster,
) -> None:
    """As above, with more usage than a's row holds: stored, it takes the row below zero, which
    others read as credit. It is consumed already: the next keeper round must cover it, as it
    does usage above a reservation, not the next idle scan (a heartbeat away)."""
    await shared.put_credit("u", {OUT: None})
    a = await shared.process("a", {}, poll=3600.0, heartbeat=3600.0)  # rounds by hand
    b = await shared.process("b", {}, poll=3600.0, heartbeat=3600.0, recall_wait=0.3)
    b.ledger.poll = 0.02
    free = await a.ledger.reserve("u", {OUT: 300})
    assert isinstance(free, Reservation)
    a.ledger.settle(free, {OUT: 300})  # used 300 while unlimited
    await shared.put_credit("u", {OUT: 1000})
    a.ledger.invalidate("u")
    assert isinstance(await a.ledger.reserve("u", {OUT: 100}), Reservation)  # in flight
    assert await shared.leases("u") == {a.owner: 250}
    rec = record("r1", "u", a.owner, {}, {OUT: 300})
    await a.store.finish_requests([rec])
    a.ledger.stored([rec])
    assert await shared.leases("u") == {a.owner: -50}
    await a.keeper.tick()  # a poll round (no heartbeat due)
    assert await shared.leases("u") == {a.owner: 100}  # what covers the 100 in flight
    # 300 consumed and 100 reserved of 1,000: 600 are left, not 750.
    assert await b.ledger.reserve("u", {OUT: 601}) == Refusal(meter=OUT, needed=601, remaining=600)
