"""The quota ledger on its own: atomic reserve, settle, and refreshes while requests are in flight."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.quota import Ledger, Refusal, limits_for, meter_status, overall_status
from gateway.store import Store
from gateway.store.base import CustomerLimits, MeterLimit
from tests.support_leases import record

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


async def test_credits_granted_once_are_not_granted_again_each_month(store: Store) -> None:
    # No subscription: the window is the calendar month, but credits Polar granted once (a one-time
    # product) never reset there, so what earlier months used stays used.
    october, november = datetime(2026, 10, 20, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC)
    used = record("req_october", "u", "", {}, {OUT: 900, IN: 80})
    used.started_at, used.started_iso = october, ""
    await store.finish_requests([used])
    credit = {OUT: MeterLimit(OUT, credited=1000)}
    await store.put_limits(CustomerLimits("u", credit, None, None, snapshot_at=october, updated_at=october))
    ledger = Ledger(store, {IN: 100}, clock=lambda: november)
    uq = await ledger.get("u")
    assert (uq.meters[OUT].credited, uq.meters[OUT].consumed) == (100, 0)
    assert (uq.meters[IN].credited, uq.meters[IN].consumed) == (100, 0)  # the plan's allowance is monthly
    assert Ledger.reserve(uq, {OUT: 101}) == Refusal(meter=OUT, needed=101, remaining=100)
    # With a subscription Polar credits each cycle (and resets the balance): the credits stand whole.
    start, end = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    await store.put_limits(CustomerLimits("u", credit, start, end, snapshot_at=november, updated_at=november))
    ledger.invalidate("u")
    assert (await ledger.get("u")).meters[OUT].credited == 1000


def test_a_subscription_period_that_ended_rolls_on_until_the_renewal_arrives() -> None:
    # Polar renews at the period's end; its snapshot may come minutes later. Until then the next period
    # of the same length, not the calendar month (which would count part of the old period's usage).
    start, end = datetime(2026, 11, 15, tzinfo=UTC), datetime(2026, 12, 15, tzinfo=UTC)
    credit = {OUT: MeterLimit(OUT, credited=1000)}
    limits = CustomerLimits("u", credit, start, end, snapshot_at=start, updated_at=start)
    assert limits_for({}, limits, datetime(2026, 12, 1, tzinfo=UTC))[:2] == (start, end)
    assert limits_for({}, limits, end)[:2] == (end, end + timedelta(days=30))
    assert limits_for({}, limits, datetime(2027, 1, 20, tzinfo=UTC))[:2] == (
        datetime(2027, 1, 14, tzinfo=UTC),
        datetime(2027, 2, 13, tzinfo=UTC),
    )
    assert limits_for({}, limits, datetime(2026, 11, 1, tzinfo=UTC))[:2] == (  # before it (clocks): the month
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
    )


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
