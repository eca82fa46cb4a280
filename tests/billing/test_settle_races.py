"""Settling a dead process beside other processes that look at its journal at the same moment (a
restarted worker recovering it at its start, another keeper's `held` probe): its leases go only
once its journal is in the store."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from gateway.billing.protocols import Reservation
from gateway.journal import SUFFIX
from gateway.quota import Refusal
from gateway.timeutil import month_bounds, utcnow
from tests.conftest import wait_until_async
from tests.support_leases import Cluster, Proc, record

OUT = "claude_output_tokens"


async def test_a_dead_process_whose_journal_another_holds_is_not_released_before_it_is_stored(
    shared: Cluster,
) -> None:
    a = await shared.process("a", {OUT: 1000}, journal=True, stale=0.5, start=False)  # its keeper run by hand
    d = await shared.process("d", {OUT: 1000}, journal=True, stale=0.5, heartbeat=0.05)
    await d.finish_unstored("r1", "u", OUT, 40, 25)  # finished, journaled, not stored: d's lease covers it
    await d.kill()
    assert await shared.leases("u") == {d.owner: 250}
    recover = a.keeper.recover
    assert recover is not None
    probed: list[Path] = []

    async def beside_a_probe(directory: Path) -> object:
        # Between a's `held` check and its recovery, another process looks at d's segment (its
        # keeper's `held` probe; or a restarted worker's recovery at start, which holds it longer).
        (segment,) = _segments(directory, d.owner)
        fd = os.open(segment, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            probed.append(segment)
            return await recover(directory)
        finally:
            os.close(fd)

    a.keeper.recover = beside_a_probe

    async def settled() -> list[str]:
        return await a.keeper.settle_dead()

    assert await wait_until_async(lambda: _stale(a, d.owner))
    assert await settled() == [] and probed  # its journal could not be read: d stays leased
    assert await shared.leases("u") == {d.owner: 250}
    a.keeper.recover = recover
    assert await wait_until_async(settled) == [d.owner]  # once d's claim lapsed: read, stored, released
    assert await shared.leases("u") == {}
    assert await a.store.consumed("u", *month_bounds(utcnow())) == {OUT: 25}
    assert isinstance(await a.ledger.reserve("u", {OUT: 975}), Reservation)
    assert await a.ledger.reserve("u", {OUT: 1}) == Refusal(meter=OUT, needed=1, remaining=0)


async def test_a_dead_process_whose_journal_holds_a_record_the_store_refuses_is_settled(shared: Cluster) -> None:
    # Recovery raised on the refused record at every round: the keeper never released d's leases.
    a = await shared.process("a", {OUT: 1000}, journal=True, stale=0.5, start=False)  # its keeper run by hand
    d = await shared.process("d", {OUT: 1000}, journal=True, stale=0.5, heartbeat=0.05)
    await d.finish_unstored("r1", "u", OUT, 40, 25)
    assert d.journal is not None
    bad = record("r_bad", "u", d.owner, {OUT: 40}, {OUT: 5})
    bad.status_code = 2**63  # more than the store's integer column holds
    d.journal.begin(bad)
    d.journal.finish(bad)
    directory = d.journal.directory
    assert directory is not None
    await d.kill()

    async def settled() -> list[str]:
        return await a.keeper.settle_dead()

    assert await wait_until_async(lambda: _stale(a, d.owner))
    assert await wait_until_async(settled) == [d.owner]
    assert await shared.leases("u") == {}
    assert await a.store.consumed("u", *month_bounds(utcnow())) == {OUT: 25}
    assert _segments(directory, d.owner) == []
    (rejected,) = (directory / "rejected").iterdir()
    assert [b'"r_bad"' in line for line in rejected.read_bytes().splitlines()] == [True, True]


def _segments(directory: Path, owner: str) -> list[Path]:
    return list(directory.glob(f"{owner}.*{SUFFIX}"))


async def _stale(a: Proc, owner: str) -> bool:
    return owner in [p.owner for p in await a.store.stale_processes(a.owner, 0.5)]
