"""The quota ledger on its own: atomic reserve, settle, and refreshes while requests are in flight."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.quota import Ledger, Refusal, meter_status, overall_status
from gateway.store import Store
from gateway.store.base import CustomerLimits, MeterLimit

OUT = "claude_output_tokens"
IN = "claude_input_tokens"


async def test_reserve_refuses_when_it_does_not_fit(store: Store) -> None:
    ledger = Ledger(store, {OUT: 100})
    uq = await ledger.get("u")
    assert Ledger.reserve(uq, {OUT: 64}) is None
    assert Ledger.reserve(uq, {OUT: 64}) == Refusal(meter=OUT, needed=64, remaining=36)
    Ledger.settle(uq, {OUT: 64}, {OUT: 15})
    assert (uq.meters[OUT].consumed, uq.meters[OUT].reserved) == (15, 0)


async def test_a_refusal_takes_nothing_from_the_meters_before_it(store: Store) -> None:
    ledger = Ledger(store, {OUT: 100})
    uq = await ledger.get("u")
    assert Ledger.reserve(uq, {IN: 5, OUT: 64}) is None
    reserved = {name: (st.credited, st.consumed, st.reserved) for name, st in uq.meters.items()}
    # IN and "new" come before the refused OUT: IN keeps what it held, "new" is not created
    assert Ledger.reserve(uq, {IN: 7, "new": 3, OUT: 64}) == Refusal(meter=OUT, needed=64, remaining=36)
    assert {name: (st.credited, st.consumed, st.reserved) for name, st in uq.meters.items()} == reserved


async def test_refresh_while_in_flight_keeps_reservations_on_one_object(store: Store) -> None:
    ledger = Ledger(store, {OUT: 100})
    uq = await ledger.get("u")
    Ledger.reserve(uq, {OUT: 64})  # request A in flight
    now = datetime.now(UTC)
    await store.put_limits(
        CustomerLimits("u", {OUT: MeterLimit(OUT, credited=200)}, None, None, snapshot_at=now, updated_at=now)
    )
    ledger.invalidate("u")
    uq2 = await ledger.get("u")  # the next pre-check reloads the limits
    assert uq2 is uq and uq2.meters[OUT].credited == 200 and uq2.source == "polar"
    Ledger.settle(uq, {OUT: 64}, {OUT: 15})  # A finishes on the object it reserved on
    assert (uq2.meters[OUT].consumed, uq2.meters[OUT].reserved) == (15, 0)
    assert Ledger.reserve(uq2, {OUT: 185}) is None


def test_status_thresholds() -> None:
    from gateway.quota import MeterState

    s = [meter_status("m", MeterState(credited=100, consumed=c), 0.75, 0.9) for c in (10, 75, 90, 100)]
    assert [x.status for x in s] == ["ok", "warning", "critical", "exceeded"]
    assert overall_status(s) == "exceeded"
    unlimited = meter_status("m", MeterState(credited=None, consumed=5), 0.75, 0.9)
    assert (unlimited.credited, unlimited.remaining, unlimited.percent_used, unlimited.status) == (
        None,
        None,
        None,
        "ok",
    )
