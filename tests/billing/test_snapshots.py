"""What /api/billing/status shows (ledger snapshots): what the pre-check counts, whichever process
answers, and what the store counts."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.billing.ledger import InProcessLedger
from gateway.billing.protocols import Reservation
from gateway.quota import Ledger, Refusal, meter_status
from gateway.store import Store
from tests.support_leases import cluster, record

OUT = "claude_output_tokens"


async def test_status_counts_another_process_request_in_flight(tmp_path: Path) -> None:
    """b has a request in flight (600 of 1000 reserved): the pre-check in a counts it (a 500 is
    refused with 400 remaining), so a's status must not say 1000 remain."""
    async with cluster("sqlite", tmp_path) as db:
        a = await db.process("a", {OUT: 1000})
        b = await db.process("b", {OUT: 1000})
        res = await b.ledger.reserve("u", {OUT: 600})
        assert isinstance(res, Reservation)
        at_b = meter_status(OUT, (await b.ledger.snapshot("u")).meter(OUT), 0.75, 0.9)
        at_a = meter_status(OUT, (await a.ledger.snapshot("u")).meter(OUT), 0.75, 0.9)
        refused = await a.ledger.reserve("u", {OUT: 500})
        assert refused == Refusal(meter=OUT, needed=500, remaining=400)  # the pre-check counts b's 600
        assert (at_a.remaining, at_a.status) == (at_b.remaining, at_b.status) == (400, "ok")


async def test_status_counts_another_process_finished_request_not_yet_stored(tmp_path: Path) -> None:
    async with cluster("sqlite", tmp_path) as db:
        a = await db.process("a", {OUT: 1000})
        b = await db.process("b", {OUT: 1000})
        res = await b.ledger.reserve("u", {OUT: 900})
        assert isinstance(res, Reservation)
        b.ledger.settle(res, {OUT: 900})  # finished, the recorder has not stored it yet
        at_b = meter_status(OUT, (await b.ledger.snapshot("u")).meter(OUT), 0.75, 0.9)
        at_a = meter_status(OUT, (await a.ledger.snapshot("u")).meter(OUT), 0.75, 0.9)
        assert (at_b.remaining, at_b.status) == (100, "critical")
        assert (at_a.remaining, at_a.status) == (100, "critical")


class _PausedConsumed:
    """The store, whose `consumed` read returns only once `gate` opens (another connection's commit
    and the recorder's callback land meanwhile, as they do on a PostgreSQL pool)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.read = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def consumed(self, user_id: str, start: datetime, end: datetime) -> dict[str, int]:
        got = await self._store.consumed(user_id, start, end)
        self.read.set()
        await self.gate.wait()
        return dict(got)


async def test_snapshot_counts_a_request_stored_while_it_reads(tmp_path: Path) -> None:
    async with cluster("sqlite", tmp_path) as db:
        a = await db.process("a", {OUT: 1000})
        res = await a.ledger.reserve("u", {OUT: 100})
        assert isinstance(res, Reservation)
        a.ledger.settle(res, {OUT: 60})
        paused = _PausedConsumed(a.store)
        a.ledger.store = paused  # type: ignore[assignment]
        snap = asyncio.create_task(a.ledger.snapshot("u"))
        await asyncio.wait_for(paused.read.wait(), 5)  # it read the store's consumed: 0
        rec = record("r1", "u", a.owner, {OUT: 100}, {OUT: 60})
        await a.store.finish_requests([rec])  # the recorder stores it ...
        a.ledger.stored([rec])  # ... and tells the ledger
        paused.gate.set()
        quota = await asyncio.wait_for(snap, 5)
        assert quota.meter(OUT).consumed == 60  # counted once: neither twice nor not at all


async def test_in_process_status_after_the_period_ends_counts_only_the_new_period(store: Store) -> None:
    now = [datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)]
    ledger = InProcessLedger(Ledger(store, {OUT: 1000}, clock=lambda: now[0]))
    res = await ledger.reserve("u", {OUT: 500})  # started in December
    assert isinstance(res, Reservation)
    now[0] = datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert (await ledger.snapshot("u")).period_start == datetime(2027, 1, 1, tzinfo=UTC)
    rec = record("r1", "u", "", {OUT: 500}, {OUT: 400})
    rec.started_at = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    ledger.settle(res, {OUT: 400})
    await store.finish_requests([rec])
    ledger.stored([rec])
    jan = await store.consumed("u", datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC))
    assert jan == {}  # the store counts it in December (its events carry its start)
    quota = await ledger.snapshot("u")
    assert (quota.meter(OUT).consumed, quota.meter(OUT).reserved) == (0, 0)
