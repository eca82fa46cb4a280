"""A change of a user's limits is never lost: not while their first load reads, not when a reload
fails (both ledgers), not to the refresher's own snapshot time, not when announcing it fails."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.billing.leases import LeasedLedger
from gateway.meters import CLAUDE_INPUT
from gateway.polar.limits import LimitsRefresher
from gateway.quota import Ledger
from gateway.store import Store
from gateway.store.base import CustomerLimits, MeterLimit
from gateway.timeutil import utcnow


def limits(user: str, credited: int, at: datetime) -> CustomerLimits:
    return CustomerLimits(user, {CLAUDE_INPUT: MeterLimit(CLAUDE_INPUT, credited)}, None, None, at, at)


class Gated:
    """The store, with a get_limits that can pause after its read, or fail once."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.pause = False
        self.fail = False
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get_limits(self, user_id: str) -> CustomerLimits | None:
        if self.fail:
            self.fail = False
            raise OSError("database is locked")
        got = await self._inner.get_limits(user_id)
        if self.pause:
            self.read.set()
            await self.release.wait()
        return got


def make_ledger(kind: str, store: Any) -> Any:
    if kind == "in_process":
        return Ledger(store, {})
    return LeasedLedger(store, store, "owner-1", {})


async def credited(kind: str, ledger: Any, user: str) -> int | None:
    uq = await (ledger.get(user) if kind == "in_process" else ledger.snapshot(user))
    return uq.meter(CLAUDE_INPUT).credited


T1 = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)


async def _credited_1000(store: Store, kind: str) -> tuple[Gated, Any]:
    """u1 credited 1000 since T1, and a ledger of `kind` on the gated store (nothing loaded yet)."""
    await store.put_limits(limits("u1", 1000, T1))
    gated = Gated(store)
    return gated, make_ledger(kind, gated)


@pytest.mark.parametrize("kind", ["in_process", "leased"])
async def test_invalidation_during_first_load_is_not_lost(store: Store, kind: str) -> None:
    gated, ledger = await _credited_1000(store, kind)
    gated.pause = True
    first = asyncio.create_task(credited(kind, ledger, "u1"))
    await asyncio.wait_for(gated.read.wait(), 5)  # the first load has read the old limits
    # meanwhile a webhook stores new limits and invalidates (Services.limits_changed / the keeper)
    assert await store.put_limits(limits("u1", 0, T1 + timedelta(seconds=1)))
    ledger.invalidate("u1")
    gated.pause = False
    gated.release.set()
    await asyncio.wait_for(first, 5)
    assert await credited(kind, ledger, "u1") == 0  # the change must be seen by the next pre-check


@pytest.mark.parametrize("kind", ["in_process", "leased"])
async def test_invalidation_survives_a_failed_reload(store: Store, kind: str) -> None:
    gated, ledger = await _credited_1000(store, kind)
    assert await credited(kind, ledger, "u1") == 1000
    assert await store.put_limits(limits("u1", 0, T1 + timedelta(seconds=1)))
    ledger.invalidate("u1")
    gated.fail = True  # the reload fails once (store busy)
    with pytest.raises(OSError):
        await credited(kind, ledger, "u1")
    assert await credited(kind, ledger, "u1") == 0  # the next pre-check must still reload


async def test_refresher_not_a_customer_snapshot_is_taken_before_the_read(store: Store) -> None:
    """A customer created (and its state_changed sent) while the refresher's lookup was in flight:
    the webhook carries a newer snapshot than what the lookup saw, so it must win."""
    changed_at: list[datetime] = []

    class Source:
        async def customer_limits(self, user_id: str) -> CustomerLimits | None:
            at = utcnow()  # Polar answered 404, then the customer got its subscription
            changed_at.append(at)
            while utcnow() <= at:  # (the answer takes its time to come back)
                pass
            return None

    await store.create_key("k1", "u1", "", "pgw_x", b"hash-1")

    async def on_changed(_user: str) -> None:
        pass

    refresher = LimitsRefresher(store, Source(), 900.0, on_changed)
    assert await refresher.refresh_once() == 1
    # the webhook with the change, delivered just after
    assert await store.put_limits(limits("u1", 5000, changed_at[0])), "newer webhook refused as stale"
    got = await store.get_limits("u1")
    assert got is not None and got.meters[CLAUDE_INPUT].credited == 5000


async def test_refresher_retries_a_failed_change_notification(store: Store) -> None:
    """The refresher stored new limits but telling the other processes failed (store hiccup on the
    invalidation insert): a later round must tell them, or they keep the old limits indefinitely."""
    t0 = datetime.now(UTC) - timedelta(hours=2)
    await store.put_limits(limits("u1", 1000, t0))

    class Source:
        async def customer_limits(self, user_id: str) -> CustomerLimits | None:
            return limits(user_id, 0, utcnow())

    told: list[str] = []
    failing = [True]

    async def on_changed(user_id: str) -> None:
        if failing.pop() if failing else False:
            raise OSError("could not insert the invalidation")
        told.append(user_id)

    refresher = LimitsRefresher(store, Source(), 900.0, on_changed)
    with pytest.raises(OSError):
        await refresher.refresh_once()  # (run_forever logs it and tries again next round)
    got = await store.get_limits("u1")
    assert got is not None and got.meters[CLAUDE_INPUT].credited == 0  # stored
    for _ in range(3):
        await refresher.refresh_once()
    assert told == ["u1"], "the change was stored but never announced"
