"""The shared quota ledger: several processes (ledgers with their own owner ids and store
connections) on one SQLite file or PostgreSQL database."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from gateway.billing.leases import LeasesLapsed
from gateway.billing.protocols import Reservation
from gateway.quota import Refusal
from gateway.store.leases_base import Invalidation, InvalidationKind
from gateway.timeutil import iso, month_bounds, utcnow
from tests.conftest import wait_until_async
from tests.support_leases import Cluster, CutOff, cluster, count_log_reads, record

OUT = "claude_output_tokens"


async def test_parallel_reservations_over_three_processes_never_pass_on_one_balance(shared: Cluster) -> None:
    procs = [await shared.process(f"p{i}", {OUT: 300}) for i in range(3)]
    results = await asyncio.gather(*(procs[i % 3].ledger.reserve("u", {OUT: 7}) for i in range(100)))
    granted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, Refusal)]
    # 300 // 7 = 42 fit: no more (one balance spent twice) and no fewer (a false refusal).
    assert (len(granted), len(refused)) == (42, 58)
    assert {(r.meter, r.needed) for r in refused} == {(OUT, 7)}
    leases = await shared.leases("u")
    assert sum(leases.values()) <= 300
    assert sum(p.ledger._users["u"].held[OUT].reserved for p in procs) == 294


async def test_a_batch_with_replays_takes_only_its_new_rows_off_the_lease(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 1000})
    assert isinstance(await a.ledger.reserve("u", {OUT: 100}), Reservation)
    assert await shared.leases("u") == {a.owner: 250}
    r1, r2, r3 = (record(f"r{i}", "u", a.owner, {OUT: 10}, {OUT: 10 * i}) for i in (1, 2, 3))
    await a.store.finish_requests([r1])
    assert await shared.leases("u") == {a.owner: 240}
    await a.store.finish_requests([r1, r2, r3])  # r1 again (journal recovery): only r2 and r3 are new
    assert await shared.leases("u") == {a.owner: 190}


async def test_sequential_reservations_alternating_succeed_until_the_last_that_fits(shared: Cluster) -> None:
    procs = [await shared.process(f"p{i}", {OUT: 100}) for i in range(3)]
    results = [await procs[i % 3].ledger.reserve("u", {OUT: 10}) for i in range(11)]
    # Other processes held idle slices on the way (a quarter of what was left each time); each
    # was recalled when needed, never a reason to refuse: exactly 10 fit.
    assert [type(r).__name__ for r in results[:10]] == ["Reservation"] * 10, results
    assert results[10] == Refusal(meter=OUT, needed=10, remaining=0)
    assert sum((await shared.leases("u")).values()) == 100
    assert [p.ledger._users["u"].held[OUT].idle for p in procs] == [0, 0, 0]


async def test_settle_and_stored_count_usage_exactly_once(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 1000})
    b = await shared.process("b", {OUT: 1000})
    res = await a.ledger.reserve("u", {OUT: 100})
    assert isinstance(res, Reservation)
    assert await shared.leases("u") == {a.owner: 250}  # a quarter of the 1000 available, at least the 100 needed
    a.ledger.settle(res, {OUT: 60})
    rec = record("r1", "u", a.owner, {OUT: 100}, {OUT: 60})
    await a.store.finish_requests([rec])
    assert await shared.leases("u") == {a.owner: 190}  # the stored 60 left the lease in the same transaction
    a.ledger.stored([rec])
    await a.store.finish_requests([rec])  # a replay (journal recovery) takes nothing off twice
    assert await shared.leases("u") == {a.owner: 190}
    snap = await a.ledger.snapshot("u")
    assert (snap.meter(OUT).credited, snap.meter(OUT).consumed, snap.meter(OUT).reserved) == (1000, 60, 0)

    # b gets exactly the rest: 750 unleased, then a's idle 190 by recall, then nothing.
    assert isinstance(await b.ledger.reserve("u", {OUT: 750}), Reservation)
    assert isinstance(await b.ledger.reserve("u", {OUT: 189}), Reservation)
    assert isinstance(await b.ledger.reserve("u", {OUT: 1}), Reservation)
    assert await b.ledger.reserve("u", {OUT: 1}) == Refusal(meter=OUT, needed=1, remaining=0)
    assert await shared.leases("u") == {a.owner: 0, b.owner: 940}


async def test_a_dead_process_is_released_after_its_journal_is_recovered(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 1000}, journal=True, stale=0.5, start=False)  # its keeper run by hand
    d = await shared.process("d", {OUT: 1000}, journal=True, stale=0.5, heartbeat=0.05)
    assert d.journal is not None
    res1 = await d.ledger.reserve("u", {OUT: 40})
    res2 = await d.ledger.reserve("u", {OUT: 10})
    assert isinstance(res1, Reservation) and isinstance(res2, Reservation)
    r1 = record("r1", "u", d.owner, {OUT: 40}, {OUT: 25})
    r2 = record("r2", "u", d.owner, {OUT: 10}, {})
    d.journal.begin(r1)
    d.journal.finish(r1)
    d.ledger.settle(res1, {OUT: 25})
    d.journal.begin(r2)  # still in flight when it dies
    assert await shared.leases("u") == {d.owner: 250}

    # Silent but alive (its journal still locked): stale, yet left alone.
    task = d.keeper._task
    assert task is not None
    task.cancel()

    async def stale() -> bool:
        return bool(await a.store.stale_processes(a.owner, 0.5))

    await wait_until_async(stale)
    assert await a.keeper.settle_dead() == []
    assert await shared.leases("u") == {d.owner: 250}

    await d.kill()

    async def released() -> bool:
        return await a.keeper.settle_dead() == [d.owner]

    await wait_until_async(released)
    assert await _released(shared, d.owner)
    assert await shared.leases("u") == {}
    # Its finished request counted exactly, the one in flight by its reservation; once each.
    rows = await shared.query("SELECT id, usage FROM requests ORDER BY id")
    assert [r[0] for r in rows] == ["r1", "r2"]
    assert await a.store.consumed("u", *month_bounds(utcnow())) == {OUT: 35}
    assert isinstance(await a.ledger.reserve("u", {OUT: 965}), Reservation)
    assert await a.ledger.reserve("u", {OUT: 1}) == Refusal(meter=OUT, needed=1, remaining=0)


async def test_a_dead_process_on_another_host_is_released_on_heartbeat_expiry(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 100}, stale=0.5, heartbeat=0.05)
    r = await shared.process("r", {OUT: 100}, host="elsewhere", stale=0.5, heartbeat=0.05)
    assert isinstance(await r.ledger.reserve("u", {OUT: 30}), Reservation)
    assert await shared.leases("u") == {r.owner: 30}  # close to the limit: a quarter is less than the need
    await r.kill()
    await wait_until_async(lambda: _released(shared, r.owner))
    assert await shared.leases("u") == {}
    assert isinstance(await a.ledger.reserve("u", {OUT: 100}), Reservation)


async def test_a_process_cut_off_from_the_database_spends_no_lease_once_it_may_be_released(
    shared: Cluster,
) -> None:
    # A partition: r serves clients but its heartbeats no longer reach the database. Once a is
    # entitled to take r for dead and give r's leases to others, r must not spend them.
    a = await shared.process("a", {OUT: 1000}, host="here", stale=0.5, heartbeat=0.05)
    r = await shared.process("r", {OUT: 1000}, host="elsewhere", stale=0.5, heartbeat=0.05)
    assert isinstance(await r.ledger.reserve("u", {OUT: 40}), Reservation)  # in flight
    assert await shared.leases("u") == {r.owner: 250}  # 210 of it idle, spendable without a round trip
    link = CutOff(r.store)
    r.keeper.store = link
    link.cut()
    await wait_until_async(lambda: _released(shared, r.owner))  # a took r for dead: its leases are free
    assert isinstance(await a.ledger.reserve("u", {OUT: 960}), Reservation)
    # r's idle 210 were released with the rest: spending them would consume 1,210 of a 1,000 credit.
    assert r.ledger.reserve_held("u", {OUT: 200}) is None
    with pytest.raises(LeasesLapsed):
        await r.ledger.reserve("u", {OUT: 200})
    link.open.set()  # the partition heals: r finds itself taken for dead and puts back what is in flight
    await wait_until_async(lambda: _leases_are(shared, {a.owner: 960, r.owner: 40}))

    async def answer() -> Reservation | Refusal | None:
        with contextlib.suppress(LeasesLapsed):  # until a heartbeat sent after the heal went through
            return await r.ledger.reserve("u", {OUT: 1})
        return None

    assert await wait_until_async(answer) == Refusal(meter=OUT, needed=1, remaining=0)


async def test_a_process_that_beats_after_it_was_claimed_keeps_its_leases(shared: Cluster) -> None:
    # b claims a (stale to it), then a, only slow, beats before b releases: a is alive and spending
    # its leases, so the release must not happen (a would keep reserving from leases given to others).
    a = await shared.process("a", {OUT: 1000}, poll=3600.0, heartbeat=3600.0)
    b = await shared.process("b", {OUT: 1000}, poll=3600.0, heartbeat=3600.0)
    assert isinstance(await a.ledger.reserve("u", {OUT: 40}), Reservation)
    claim = await b.store.claim_process(a.owner, 0.0)
    assert claim is not None
    assert await a.store.heartbeat(a.owner) is True
    assert await b.store.release_owner(a.owner, claim) is None
    assert await shared.leases("u") == {a.owner: 250}
    assert len(await shared.query("SELECT owner FROM processes WHERE owner = ?", a.owner)) == 1
    claim = await b.store.claim_process(a.owner, 0.0)  # no heartbeat in between this time
    assert await b.store.release_owner(a.owner, claim) == 1
    assert await shared.leases("u") == {}


async def test_shutdown_hands_back_all_but_what_is_not_stored(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 1000}, journal=True)
    b = await shared.process("b", {OUT: 1000}, journal=True, start=False)  # its keeper run by hand
    await a.finish_unstored("ra", "u", OUT, 100, 60)
    await a.keeper.close()  # the 60 never reached the store: its lease stays, the process row expires
    assert await shared.leases("u") == {a.owner: 60}
    assert await b.keeper.settle_dead() == []  # (its journal is still open: alive)
    a.journal.close()  # the process exits; the next one recovers its journal, then releases it
    assert await b.keeper.settle_dead() == [a.owner]
    assert await _released(shared, a.owner)
    assert await b.store.consumed("u", *month_bounds(utcnow())) == {OUT: 60}
    assert await shared.leases("u") == {}

    res_b = await b.ledger.reserve("u", {OUT: 10})
    assert isinstance(res_b, Reservation)
    b.ledger.settle(res_b, {OUT: 10})
    rec = record("rb", "u", b.owner, {OUT: 10}, {OUT: 10})
    await b.store.finish_requests([rec])
    b.ledger.stored([rec])
    await b.keeper.close()  # everything stored: nothing stays
    assert await shared.leases("u") == {}
    assert await shared.query("SELECT owner FROM processes") == []


async def test_a_process_taken_for_dead_puts_back_what_covers_its_requests(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 1000}, heartbeat=0.05)
    b = await shared.process("b", {OUT: 1000})
    assert isinstance(await a.ledger.reserve("u", {OUT: 40}), Reservation)
    assert await shared.leases("u") == {a.owner: 250}
    await b.store.release_owner(a.owner)
    await wait_until_async(lambda: _leases_are(shared, {a.owner: 40}))
    assert len(await shared.query("SELECT owner FROM processes WHERE owner = ?", a.owner)) == 1


async def test_invalidations_reach_every_process_within_a_second(shared: Cluster) -> None:
    await shared.put_credit("u", {OUT: 100})
    a = await shared.process("a", {})
    b = await shared.process("b", {})
    assert isinstance(await a.ledger.reserve("u", {OUT: 10}), Reservation)
    await shared.put_credit("u", {OUT: 5})
    t0 = time.monotonic()
    await b.store.notify_invalidation(InvalidationKind.LIMITS, "u")
    await b.store.notify_invalidation(InvalidationKind.KEY, "key-1")

    async def seen() -> bool:
        return (await a.ledger.snapshot("u")).meter(OUT).credited == 5

    await wait_until_async(seen, within=1.0)
    await wait_until_async(lambda: _has(a.invalidations, Invalidation(0, "key", "key-1")), within=1.0)
    assert time.monotonic() - t0 < 1.0
    # The new credit holds at once: a's idle slice, sized on 100, went back on the reload.
    assert await a.ledger.reserve("u", {OUT: 1}) == Refusal(meter=OUT, needed=1, remaining=0)
    assert await shared.leases("u") == {a.owner: 10}


async def test_the_keeper_reads_the_log_only_when_its_watch_moves(shared: Cluster) -> None:
    a = await shared.process("a", {}, poll=3600.0, heartbeat=3600.0)  # ticked by hand below
    b = await shared.process("b", {})
    reads = count_log_reads(a.keeper)
    for _ in range(5):
        await a.keeper.tick()
    assert reads.count == 0
    await b.store.notify_invalidation(InvalidationKind.KEY, "key-1")

    async def told() -> bool:
        await a.keeper.tick()
        return await _has(a.invalidations, Invalidation(0, "key", "key-1"))

    await wait_until_async(told, within=1.0)
    assert reads.count == 1
    await a.keeper.tick()
    assert reads.count == 1


async def test_an_entry_whose_signal_was_lost_is_read_at_the_next_heartbeat(shared: Cluster) -> None:
    a = await shared.process("a", {}, heartbeat=0.1)
    reads = count_log_reads(a.keeper)
    await wait_until_async(lambda: _at_least(reads.count, 2))  # heartbeats read, with nothing notified
    insert = "INSERT INTO invalidations (kind, subject, created_at) VALUES ('key', 'unsignalled', ?)"
    await shared.query(insert, utcnow() if shared.kind == "postgres" else iso(utcnow()))
    await wait_until_async(lambda: _has(a.invalidations, Invalidation(0, "key", "unsignalled")), within=1.0)


async def test_a_watch_moves_once_an_entry_is_notified(shared: Cluster) -> None:
    store = await shared.store()
    watch = await store.watch_invalidations()
    try:
        before = watch.mark()
        assert before is not None and watch.mark() == before

        async def moved() -> bool:
            return watch.mark() not in (before, None)

        await store.notify_invalidation(InvalidationKind.KEY, "key-1")
        await wait_until_async(moved, within=1.0)
    finally:
        await watch.close()
        await store.close()


async def test_without_a_signal_file_the_keeper_reads_the_log_every_poll(tmp_path: Path) -> None:
    async with cluster("sqlite", tmp_path) as shared:
        (tmp_path / "gateway.shared-invalidations").mkdir()  # (in the signal file's way)
        a = await shared.process("a", {}, heartbeat=3600.0)  # no heartbeat read to fall back on
        b = await shared.process("b", {})
        await b.store.notify_invalidation(InvalidationKind.KEY, "key-1")
        await wait_until_async(lambda: _has(a.invalidations, Invalidation(0, "key", "key-1")), within=1.0)


async def test_a_lost_listen_connection_falls_back_to_reading_the_log_and_listens_again(tmp_path: Path) -> None:
    async with cluster("postgres", tmp_path) as shared:
        a = await shared.process("a", {}, heartbeat=3600.0)  # only the watch tells a to read
        b = await shared.process("b", {})
        listeners = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        assert len(await shared.query(listeners)) == 2
        await shared.query(f"SELECT pg_terminate_backend(pid) FROM ({listeners}) AS l")
        await b.store.notify_invalidation(InvalidationKind.KEY, "while-deaf")
        await wait_until_async(lambda: _has(a.invalidations, Invalidation(0, "key", "while-deaf")), within=1.0)

        async def listening_again() -> bool:
            return len(await shared.query(listeners)) == 2

        await wait_until_async(listening_again, within=5.0)
        await b.store.notify_invalidation(InvalidationKind.KEY, "heard")
        await wait_until_async(lambda: _has(a.invalidations, Invalidation(0, "key", "heard")), within=1.0)


async def test_unlimited_meters_take_no_lease(shared: Cluster) -> None:
    a = await shared.process("a", {OUT: 10})
    res = await a.ledger.reserve("u", {OUT: 5, "claude_input_tokens": 1_000_000})
    assert isinstance(res, Reservation)
    assert await shared.leases("u") == {a.owner: 5}
    a.ledger.settle(res, {OUT: 3, "claude_input_tokens": 900})
    assert (await a.ledger.snapshot("u")).meter(OUT).consumed == 3


async def test_credits_granted_once_count_what_earlier_months_used(shared: Cluster) -> None:
    # (see tests/test_quota.py: credits Polar granted once never reset; the window is the month)
    a = await shared.process("a", {})
    before = record("req_earlier", "u", a.owner, {}, {OUT: 900})
    before.started_at = utcnow() - timedelta(days=40)
    await a.store.finish_requests([before])
    await shared.put_credit("u", {OUT: 1000})
    refused = await a.ledger.reserve("u", {OUT: 101})
    assert refused == Refusal(meter=OUT, needed=101, remaining=100)
    snap = await a.ledger.snapshot("u")
    assert (snap.meter(OUT).credited, snap.meter(OUT).consumed) == (100, 0)
    assert isinstance(await a.ledger.reserve("u", {OUT: 100}), Reservation)


async def _released(shared: Cluster, owner: str) -> bool:
    procs = await shared.query("SELECT owner FROM processes WHERE owner = ?", owner)
    leases = await shared.query("SELECT owner FROM quota_leases WHERE owner = ?", owner)
    return not procs and not leases


async def _leases_are(shared: Cluster, expected: dict[str, int]) -> bool:
    return await shared.leases("u") == expected


async def _at_least(value: int, least: int) -> bool:
    return value >= least


async def _has(items: list[Invalidation], want: Invalidation) -> bool:
    return any((i.kind, i.subject) == (want.kind, want.subject) for i in items)


async def test_an_invalidation_committed_after_a_later_one_is_still_seen(tmp_path: Path) -> None:
    # PostgreSQL hands out sequence numbers before commit: entry n can become visible after n + 1.
    async with cluster("postgres", tmp_path) as shared:
        a = await shared.process("a", {})
        conn = await asyncpg.connect(shared.dsn)
        try:
            tx = conn.transaction()
            await tx.start()
            early = "INSERT INTO invalidations (kind, subject, created_at) VALUES ('key', 'early', $1)"
            await conn.execute(early, utcnow())
            await a.store.notify_invalidation(InvalidationKind.KEY, "late")
            await wait_until_async(lambda: _has(a.invalidations, Invalidation(0, "key", "late")), within=1.0)
            await tx.commit()
        finally:
            await conn.close()
        await wait_until_async(lambda: _has(a.invalidations, Invalidation(0, "key", "early")), within=1.0)
        assert [i.subject for i in a.invalidations] == ["late", "early"]
