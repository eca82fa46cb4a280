"""Quota ledger: credited, consumed and reserved per user and meter for the current period.

The ledger is the authority for the pre-check in this process. `reserve` checks and
reserves in one synchronous step (no await between), so parallel requests can never
pass on the same remaining balance. `consumed` is loaded once per user and period from
the store and then moved forward by `settle` after each request's records are durable.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from gateway.singleflight import SingleFlight
from gateway.store.base import CustomerLimits, QuotaStore, RequestStore
from gateway.timeutil import month_bounds, utcnow

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class MeterState:
    credited: int | None  # None = unlimited
    consumed: int = 0
    reserved: int = 0

    @property
    def remaining(self) -> int | None:
        if self.credited is None:
            return None
        return self.credited - self.consumed - self.reserved


@dataclass(slots=True)
class UserQuota:
    user_id: str
    period_start: datetime
    period_end: datetime
    meters: dict[str, MeterState]
    source: str  # "polar" | "plan"
    limits_updated_at: datetime | None = None
    stale: bool = False

    def meter(self, name: str) -> MeterState:
        state = self.meters.get(name)
        if state is None:
            state = self.meters[name] = MeterState(credited=None)
        return state


@dataclass(frozen=True, slots=True)
class Refusal:
    meter: str
    needed: int
    remaining: int


T = TypeVar("T")


class LimitLoads(Generic[T]):
    """A ledger's loads of users' limits, one per user at a time, that lose no invalidation.

    A ledger marks a cached user stale when their limits change; a load clears the mark before it
    reads. Two changes would be lost to that: one arriving while a user's first load reads (nothing
    is cached yet to mark), and one whose reload fails (the mark was cleared). Both leave the user
    stale here, so the next pre-check loads again.
    """

    def __init__(self, quota: Callable[[T], UserQuota]) -> None:
        self._quota = quota  # the UserQuota of what a load returns
        self._flight: SingleFlight[str, T] = SingleFlight()
        self._first: dict[str, bool] = {}  # users loading for the first time: invalidated meanwhile

    def invalidated(self, user_id: str) -> None:
        if user_id in self._first:
            self._first[user_id] = True

    async def run(self, user_id: str, old: UserQuota | None, load: Callable[[], Awaitable[T]]) -> T:
        """`load()` (or the one running for `user_id`); `old`: the user's cached quota, if any."""
        return await self._flight.run(user_id, lambda: self._guarded(user_id, old, load))

    async def _guarded(self, user_id: str, old: UserQuota | None, load: Callable[[], Awaitable[T]]) -> T:
        if old is None:
            self._first[user_id] = False
        try:
            loaded = await load()
        except BaseException:
            if old is not None:
                old.stale = True  # not reloaded: the change still stands
            raise
        finally:
            missed = self._first.pop(user_id, False) if old is None else False
        if missed:
            self._quota(loaded).stale = True  # it read the limits from before the change
        return loaded


class Ledger:
    def __init__(self, store: QuotaStore, plan: Mapping[str, int], clock: Callable[[], datetime] = utcnow) -> None:
        self._store = store
        self._plan = dict(plan)
        self._clock = clock
        # The pre-check's period test reads the clock as a number: making a datetime costs more.
        self._now: Callable[[], float] = time.time if clock is utcnow else lambda: clock().timestamp()
        self._users: dict[str, UserQuota] = {}
        self._ends: dict[str, float] = {}  # each cached user's period_end as a timestamp
        self._loading: LimitLoads[UserQuota] = LimitLoads(lambda uq: uq)

    def cached(self, user_id: str) -> UserQuota | None:
        """The user's quota if it is loaded and current: what `get` returns, without a coroutine."""
        uq = self._users.get(user_id)
        return uq if uq is not None and not uq.stale and self._now() < self._ends[user_id] else None

    async def get(self, user_id: str) -> UserQuota:
        uq = self.cached(user_id)
        if uq is not None:
            return uq
        return await self._loading.run(user_id, self._users.get(user_id), lambda: self._load_into_cache(user_id))

    async def _load_into_cache(self, user_id: str) -> UserQuota:
        uq = self._users[user_id] = await self._load(user_id, self._users.get(user_id))
        self._ends[user_id] = uq.period_end.timestamp()
        return uq

    async def _load(self, user_id: str, old: UserQuota | None) -> UserQuota:
        """Load or refresh a user's quota. An existing object is updated in place: requests in
        flight hold it and settle their reservations on it, so it must stay the one in use."""
        if old is not None:
            old.stale = False  # an invalidation arriving while we load marks it stale again
        now = self._clock()
        limits = await self._store.get_limits(user_id)
        start, end, credited, source = await limits_now(self._store, self._plan, limits, user_id, now)
        same_period = old is not None and (old.period_start, old.period_end) == (start, end)
        consumed = None if same_period else await self._store.consumed(user_id, start, end)
        uq = old if old is not None else UserQuota(user_id, start, end, {}, source)
        if consumed is not None:  # new period: usage restarts from what the store holds for it
            for state in uq.meters.values():
                state.consumed = 0
            for name, value in consumed.items():
                uq.meter(name).consumed = value
        for name, state in uq.meters.items():
            state.credited = credited.get(name)
        for name, amount in credited.items():
            uq.meter(name).credited = amount
        uq.period_start, uq.period_end, uq.source = start, end, source
        uq.limits_updated_at = limits.updated_at if limits else None
        return uq

    def invalidate(self, user_id: str) -> None:
        """Limits changed (webhook, refresh): reload them before the next pre-check."""
        uq = self._users.get(user_id)
        if uq is not None:
            uq.stale = True
        self._loading.invalidated(user_id)

    @staticmethod
    def reserve(uq: UserQuota, amounts: Mapping[str, int]) -> Refusal | None:
        """Check and reserve in one step; synchronous on purpose (atomic within the event loop).

        One pass checks and reserves each meter; a refusal gives back what the pass took before it."""
        meters = uq.meters
        created: list[str] = []
        for name, amount in amounts.items():
            state = meters.get(name)
            if state is None:
                state = meters[name] = MeterState(credited=None)
                created.append(name)
            elif state.credited is not None:
                remaining = state.credited - state.consumed - state.reserved
                if remaining <= 0 or remaining < amount:
                    _give_back(meters, amounts, name, created)
                    return Refusal(meter=name, needed=amount, remaining=max(remaining, 0))
            state.reserved += amount
        return None

    @staticmethod
    def settle(uq: UserQuota, reserved: Mapping[str, int], actual: Mapping[str, int]) -> None:
        meters = uq.meters
        for name, amount in reserved.items():
            state = meters.get(name)
            if state is not None:  # (reserve created it)
                left = state.reserved - amount
                state.reserved = left if left > 0 else 0
        for name, amount in actual.items():
            if amount:
                state = meters.get(name)
                if state is None:
                    state = meters[name] = MeterState(credited=None)
                state.consumed += amount


def _give_back(meters: dict[str, MeterState], amounts: Mapping[str, int], refused: str, created: list[str]) -> None:
    """Undo a refused `Ledger.reserve`: the meters before `refused` lose their amounts, and the ones
    it created go, as if it had never run."""
    for name, amount in amounts.items():
        if name == refused:
            break
        meters[name].reserved -= amount
    for name in created:
        del meters[name]


def subscription_period(
    start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime] | None:
    """The subscription period holding `now`: the one Polar reported or, once it has ended, the next ones of
    the same length. Polar renews at the period's end and its snapshot of the renewal can come minutes later;
    the calendar month meanwhile would count part of the old period's usage in the new one."""
    if start is None or end is None or not start <= now or not start < end:
        return None
    if now < end:
        return start, end
    length = end - start
    ahead = (now - end) // length + 1
    return start + ahead * length, end + ahead * length


def limits_for(
    plan: Mapping[str, int], limits: CustomerLimits | None, now: datetime
) -> tuple[datetime, datetime, dict[str, int | None], str]:
    """The period, credited per meter and source of a user's limits (Polar's, else the plan)."""
    if limits is None:
        start, end = month_bounds(now)
        return start, end, dict(plan), "plan"
    period = subscription_period(limits.period_start, limits.period_end, now)
    start, end = period if period is not None else month_bounds(now)
    if not limits.active:  # subscription revoked: no credits left for any limited meter
        return start, end, {m: 0 for m in set(plan) | set(limits.meters)}, "polar"
    credited: dict[str, int | None] = dict(plan)
    for name, m in limits.meters.items():
        credited[name] = m.credited
    return start, end, credited, "polar"


def once_credited(limits: CustomerLimits | None) -> list[str]:
    """The meters whose Polar credits were granted once: a customer with credits and no subscription (a
    one-time product's meter-credit benefit). Polar never resets their balance, while the gateway's window
    without a subscription is the calendar month."""
    if limits is None or not limits.active or limits.period_start is not None:
        return []
    return [name for name, m in limits.meters.items() if m.credited is not None]


async def limits_now(
    store: RequestStore, plan: Mapping[str, int], limits: CustomerLimits | None, user_id: str, now: datetime
) -> tuple[datetime, datetime, dict[str, int | None], str]:
    """`limits_for`, with credits granted once reduced by what the months before this one used: each month
    starts its usage from zero, and without this would grant the same credits again."""
    start, end, credited, source = limits_for(plan, limits, now)
    once = once_credited(limits)
    if once:
        before = await store.consumed(user_id, _EPOCH, start)
        for name in once:
            credited[name] = max((credited[name] or 0) - before.get(name, 0), 0)
    return start, end, credited, source


@dataclass(frozen=True, slots=True)
class MeterStatus:
    name: str
    consumed: int
    reserved: int
    credited: int | None
    remaining: int | None
    percent_used: float | None
    status: str


_RANK = {"ok": 0, "warning": 1, "critical": 2, "exceeded": 3}


def meter_status(name: str, st: MeterState, warning: float, critical: float) -> MeterStatus:
    if st.credited is None:
        return MeterStatus(name, st.consumed, st.reserved, None, None, None, "ok")
    used = st.consumed + st.reserved
    ratio = used / st.credited if st.credited > 0 else (1.0 if used > 0 or st.credited == 0 else 0.0)
    if ratio >= 1.0:
        status = "exceeded"
    elif ratio >= critical:
        status = "critical"
    elif ratio >= warning:
        status = "warning"
    else:
        status = "ok"
    return MeterStatus(name, st.consumed, st.reserved, st.credited, st.credited - used, round(ratio * 100, 2), status)


def overall_status(statuses: list[MeterStatus]) -> str:
    worst = "ok"
    for s in statuses:
        if _RANK[s.status] > _RANK[worst]:
            worst = s.status
    return worst
