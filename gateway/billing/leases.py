"""The shared `QuotaLedger`: several processes on one database, by quota leases.

A process takes a slice of a user's remaining balance from the store in one atomic conditional
statement (`LeaseStore.take_lease`) and reserves requests from it in memory, so the common case
costs no database round trip. A lease covers the owner's reservations in flight, its finished
requests not yet stored and an idle part; a stored request leaves the lease in the same
transaction that stores it (the store sees to it), so usage counts once. Idle parts go back when a
user goes quiet, when another process recalls them (it is short and they would cover it) and at
shutdown; a dead process's leases are released by a live one (`keeper.LeaseKeeper`).

Fence: a process is taken for dead when its heartbeat is `stale_seconds` old, and its leases are
released then, alive or not (cut off from the database by a partition, say). So a process spends
its leases only until `stale_seconds` after it sent its last heartbeat that the store took (less a
margin, `FENCE_SHARE`); past that, until a heartbeat goes through again, a reservation is refused
as the store being unavailable, never granted from leases others may already have been given.

Mirror rule: this process's idea of its lease moves down *before* the store is told (a return)
and up only *after* the store granted (a take), so a failed or slow statement can only make it
hold less than the store says, never more.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from gateway.billing.lease_state import Held, LeaseUser
from gateway.billing.protocols import Reservation
from gateway.quota import LimitLoads, MeterState, Refusal, UserQuota, limits_now
from gateway.store.base import RequestRecord, Store
from gateway.store.leases_base import InvalidationKind, LeaseAsk, LeaseGrant, LeaseStore, LeaseTake
from gateway.timeutil import suspend_clock, utcnow

log = logging.getLogger("gateway.leases")

FENCE_SHARE = 0.9  # of `stale_seconds` after a heartbeat was sent: the leases are spent no later

# The fence's clock must run while the machine is suspended: the others' stale age does (on the
# database's clock), and `time.monotonic` (CLOCK_MONOTONIC on Linux) does not, so a process resumed
# after its leases were released would spend them until its next heartbeat.
fence_clock = suspend_clock


class LeasesLapsed(Exception):
    """No heartbeat went through for too long: this process's leases may have been released."""


class LeasedLedger:
    """Implements `gateway.billing.protocols.QuotaLedger` on a `LeaseStore` shared by processes."""

    def __init__(
        self,
        store: Store,
        leases: LeaseStore,
        owner: str,
        plan: Mapping[str, int],
        *,
        fraction: float = 0.25,
        recall_wait: float = 1.5,
        poll: float = 0.05,
        stale_seconds: float = 10.0,
        clock: Callable[[], datetime] = utcnow,
        fence_clock: Callable[[], float] = fence_clock,
    ) -> None:
        self.store = store
        self.leases = leases
        self.owner = owner
        self._plan = dict(plan)
        self.fraction = fraction
        self.recall_wait = recall_wait
        self.poll = poll
        self.stale_seconds = stale_seconds
        self._clock = clock
        # The pre-check's period test reads the clock as a number: making a datetime costs more.
        self._now: Callable[[], float] = time.time if clock is utcnow else lambda: clock().timestamp()
        self._users: dict[str, LeaseUser] = {}
        self._loading: LimitLoads[LeaseUser] = LimitLoads(lambda u: u.quota)
        self._tight: dict[str, float] = {}  # recalled users we held nothing of yet
        self.my_recalls: set[int] = set()
        self._recalled: list[LeaseUser] = []  # users another process recalled lately
        self._unsynced: list[LeaseUser] = []  # users whose hand-back failed: the store may hold more than we do
        self._short: list[LeaseUser] = []  # users who used more than their leases hold: covered next round
        self.fence_clock = fence_clock  # what `beat` and the fence read (the keeper too)
        self._fence = math.inf  # (on `fence_clock`) leases are spent before it only; set by `beat`

    # ------------------------------------------------------------------ QuotaLedger
    def beat(self, sent: float) -> None:
        """A heartbeat sent at `sent` (on `fence_clock`) was stored: nobody takes this process for dead
        (and releases its leases) before `sent + stale_seconds`."""
        self._fence = sent + FENCE_SHARE * self.stale_seconds

    async def reserve(self, user_id: str, amounts: Mapping[str, int]) -> Reservation | Refusal:
        self._fenced()
        u = self._fresh(user_id)
        if u is None:
            u = await self._user(user_id)
            self._fenced()  # (again after every wait: the fence may have passed meanwhile)
        return self._reserve_local(u, amounts) or await self._reserve_leasing(u, amounts)

    def _fenced(self) -> None:
        """Raise LeasesLapsed once the fence has passed: nothing is granted from leases after it."""
        if (now := self.fence_clock()) >= self._fence:
            late = now - self._fence + FENCE_SHARE * self.stale_seconds
            raise LeasesLapsed(f"no heartbeat stored for {late:.1f} s: this process's leases may have been released")

    def reserve_held(self, user_id: str, amounts: Mapping[str, int]) -> Reservation | None:
        u = self._fresh(user_id)
        return None if u is None or self.fence_clock() >= self._fence else self._reserve_local(u, amounts)

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> None:
        u = self._users.get(reservation.user_id)
        if u is None:
            return
        meters = u.quota.meters
        for name, amount in reservation.amounts.items():
            h = u.held.get(name)
            if h is not None:
                h.reserved -= amount
                meters[name].reserved -= amount
        for name, amount in actual.items():
            if amount > 0 and ((h := u.held.get(name)) is not None or u.quota.meter(name).credited is not None):
                if h is None:
                    h = u.held[name] = Held()
                h.unstored += amount
                meters[name].consumed += amount
                if h.idle < 0 and h.row and u not in self._short:  # (no row: left to the scan, see `keep`)
                    self._short.append(u)
            elif amount > 0:  # unlimited: no lease covers it, and `stored` must not take it off `unstored`
                u.uncounted[name] = u.uncounted.get(name, 0) + amount

    def stored(self, records: Sequence[RequestRecord]) -> None:
        for r in records:
            if r.owner != self.owner or (u := self._users.get(r.user_id)) is None:
                continue
            for name, amount in r.usage.items():
                if amount <= 0:
                    continue
                counted = amount - u.uncount(name, amount) if u.uncounted else amount
                if (h := u.held.get(name)) is not None:
                    h.unstored -= counted
                    u.quota.meter(name).consumed -= counted
                    if h.row:  # the store took all of it off the row in the same transaction
                        h.lease -= amount
                        if counted < amount and h.idle < 0 and u not in self._short:
                            self._short.append(u)  # usage no lease covered took the row below what it covers
                        if u.resynced and u not in self._unsynced:
                            # a `_resync` may have set the row after that transaction: set it again
                            self._unsynced.append(u)
            u.resynced = False

    async def snapshot(self, user_id: str) -> UserQuota:
        u = await self._user(user_id)
        q = u.quota
        # This process's part before the store is read: a request stored meanwhile is counted by the
        # store's consumed or by the leases read, never by neither.
        own = {name: (h.unstored, h.reserved, h.lease) for name, h in u.held.items()}
        leased = await self.leases.lease_totals(user_id)  # every process's, as the pre-check counts them
        consumed = await self.store.consumed(user_id, q.period_start, q.period_end)
        out = UserQuota(user_id, q.period_start, q.period_end, {}, q.source, q.limits_updated_at)
        for name, st in q.meters.items():
            unstored, reserved, lease = own.get(name, (0, 0, 0))
            others = max(leased.get(name, 0) - lease, 0)  # other processes' in flight and unstored
            out.meters[name] = MeterState(st.credited, unstored, reserved + others)
        for name, value in consumed.items():
            out.meter(name).consumed += value
        return out

    def invalidate(self, user_id: str) -> None:
        u = self._users.get(user_id)
        if u is not None:
            u.quota.stale = True
        self._loading.invalidated(user_id)

    # ------------------------------------------------------------------ reserving
    def _reserve_local(self, u: LeaseUser, amounts: Mapping[str, int]) -> Reservation | None:
        """From the idle part of our leases, in one synchronous step (atomic within the event loop)."""
        meters, held = u.quota.meters, u.held
        for name, amount in amounts.items():
            st = meters.get(name)
            if st is None or st.credited is None:
                continue
            h = held.get(name)
            # As in `quota.Ledger`: an exhausted meter refuses even a request that reserves 0 of it.
            if h is None or h.idle < max(amount, 1):
                return None
        taken: dict[str, int] = {}  # what settle gives back: only what was reserved here
        for name, amount in amounts.items():
            if (h := held.get(name)) is not None and meters[name].credited is not None:
                h.reserved += amount
                meters[name].reserved += amount
                taken[name] = amount
        u.used_at = time.monotonic()
        return Reservation(u.quota.user_id, taken, u.quota)

    async def _reserve_leasing(self, u: LeaseUser, amounts: Mapping[str, int]) -> Reservation | Refusal:
        user_id = u.quota.user_id
        async with u.lock:
            seq, issued = u.recall
            recall_seq = seq if time.monotonic() - issued < self.recall_wait else 0
            deadline = time.monotonic() + self.recall_wait
            fresh = False  # whether recall_seq was issued for this reservation
            while True:
                self._fenced()  # (it waited: for the lock, a take, a recall's answers)
                got = self._reserve_local(u, amounts)
                if got is not None:
                    return got
                asks = self._asks(u, amounts)
                for a in asks:  # (mirror rule: a row may exist before we know the grant)
                    u.held.setdefault(a.meter, Held()).row = True
                tight = bool(recall_seq) or time.monotonic() < max(u.tight_until, self._tight.get(user_id, 0.0))
                out = await self.leases.take_lease(
                    LeaseTake(
                        self.owner,
                        user_id,
                        u.quota.period_start,
                        u.quota.period_end,
                        asks,
                        0.0 if tight else self.fraction,
                        recall_seq,
                        self.stale_seconds,
                    )
                )
                if out.granted:
                    for name, amount in out.granted.items():
                        u.held[name].lease += amount
                    continue
                if u.returning:  # our idle slice is on its way back: off our books, not yet free in the store's
                    await asyncio.sleep(self.poll)
                    continue
                short = [a for a in asks if out.available[a.meter] < a.need]
                if not out.unanswered and fresh:
                    return self._refusal(u, amounts, short, out)
                if not fresh:
                    if not all(out.available[a.meter] + out.others[a.meter] >= a.need for a in short):
                        return self._refusal(u, amounts, short, out)  # even every other lease would not cover it
                    recall_seq = await self.leases.notify_invalidation(InvalidationKind.RECALL, user_id)
                    self.my_recalls.add(recall_seq)
                    u.recall = (recall_seq, time.monotonic())
                    deadline, fresh = time.monotonic() + self.recall_wait, True
                elif time.monotonic() >= deadline:
                    return self._refusal(u, amounts, short, out)
                await asyncio.sleep(self.poll)

    def _asks(self, u: LeaseUser, amounts: Mapping[str, int]) -> list[LeaseAsk]:
        asks: list[LeaseAsk] = []
        for name, amount in amounts.items():
            credited = u.quota.meter(name).credited
            if credited is None:
                continue
            h = u.held.get(name)
            need = max(amount, 1) - (h.idle if h else 0)
            if need > 0:
                asks.append(LeaseAsk(name, credited, need))
        return asks

    @staticmethod
    def _refusal(u: LeaseUser, amounts: Mapping[str, int], short: list[LeaseAsk], out: LeaseGrant) -> Refusal:
        name = short[0].meter
        h = u.held.get(name)
        remaining = out.available[name] + max(h.idle if h else 0, 0)
        return Refusal(meter=name, needed=amounts[name], remaining=max(remaining, 0))

    # ------------------------------------------------------------------ limits view
    def _fresh(self, user_id: str) -> LeaseUser | None:
        """The user's limits view when it can be used as it is (loaded, not invalidated, in its period)."""
        u = self._users.get(user_id)
        return u if u is not None and not u.quota.stale and self._now() < u.ends else None

    async def _user(self, user_id: str) -> LeaseUser:
        if (fresh := self._fresh(user_id)) is not None:
            return fresh
        u = self._users.get(user_id)
        return await self._loading.run(user_id, u.quota if u else None, lambda: self._load(user_id, u))

    async def _load(self, user_id: str, u: LeaseUser | None) -> LeaseUser:
        """Load or refresh a user's limits in place (reservations in flight settle on this object).
        When the period or a credit changed, the idle part goes back: it was sized on the old one."""
        if u is not None:
            u.quota.stale = False
        limits = await self.store.get_limits(user_id)
        start, end, credited, source = await limits_now(self.store, self._plan, limits, user_id, self._clock())
        if u is None:
            u = self._users[user_id] = LeaseUser(UserQuota(user_id, start, end, {}, source))
        q = u.quota
        before = (q.period_start, q.period_end, {n: s.credited for n, s in q.meters.items()})
        for state in q.meters.values():
            state.credited = None
        for name, amount in credited.items():
            q.meter(name).credited = amount
        q.period_start, q.period_end, q.source = start, end, source
        u.ends = end.timestamp()
        q.limits_updated_at = limits.updated_at if limits else None
        if before != (start, end, {n: s.credited for n, s in q.meters.items()}):
            await self.return_idle(u)
        return u

    # ------------------------------------------------------------------ for the keeper
    def users(self) -> list[LeaseUser]:
        return list(self._users.values())

    async def return_idle(self, u: LeaseUser, answered: int = 0) -> None:
        """Hand the idle part of the user's leases back (and cover any usage above reservations)."""
        back: dict[str, int] = {}
        cover: dict[str, int] = {}
        for name, h in u.held.items():
            idle = h.idle
            if idle > 0 and h.row:
                h.lease -= idle  # mirror rule: down before the store is told
                back[name] = idle
            elif idle < 0:
                cover[name] = -idle
        if back or answered:
            u.returning += 1
            try:
                await self.leases.return_lease(self.owner, u.quota.user_id, back, answered)
            except Exception:
                # Whether it went back is unknown: ours stays down (never more than the store says), and
                # the next keeper round sets the store to ours, so nothing stays stranded there.
                if back and u not in self._unsynced:
                    self._unsynced.append(u)
                raise
            finally:
                u.returning -= 1
        if cover:
            for name in cover:
                u.held[name].row = True
            await self.leases.cover_lease(self.owner, u.quota.user_id, cover)
            for name, amount in cover.items():
                u.held[name].lease += amount

    async def answer_recall(self, user_id: str, seq: int) -> None:
        until = time.monotonic() + 2 * self.recall_wait
        u = self._users.get(user_id)
        if u is None:
            self._tight[user_id] = until
            return
        u.tight_until = until
        if u not in self._recalled:
            self._recalled.append(u)
        if u.returning:
            # Committed before that hand-back lands, the answer would tell the recaller all is back
            # while the store still counts it ours (a false 402): the round after it landed answers.
            u.answer = max(u.answer, seq)
            return
        u.answer = 0
        await self.return_idle(u, answered=seq)

    async def keep(self, idle_seconds: float, scan: bool) -> None:
        """One keeper round: recalls answered late go out (see `answer_recall`), the leftovers of
        recalled users go back, usage above a lease row is covered (stored first, it takes the row
        below zero: credit to others); with `scan`, also the idle parts of quiet or reloaded users,
        and usage on meters without a row (a row made now could miss its batch)."""
        for u in list(self._unsynced):
            if await self._resync(u):
                self._unsynced.remove(u)
        for u in list(self._recalled):
            if u.answer and not u.returning:
                seq, u.answer = u.answer, 0
                await self.return_idle(u, answered=seq)
        while self._short:
            if any(h.idle < 0 for h in self._short[0].held.values()):
                await self.return_idle(self._short[0])
            del self._short[0]
        now = time.monotonic()
        for key, until in list(self._tight.items()):
            if until < now:
                del self._tight[key]
        for u in list(self._users.values()) if scan else [u for u in self._recalled if u.tight_until > now]:
            if now - u.used_at >= idle_seconds or u.tight_until > now or u.quota.stale:
                if any(h.idle for h in u.held.values()):
                    await self.return_idle(u)
            elif any(h.idle < 0 for h in u.held.values()):
                await self.return_idle(u)
        self._recalled = [u for u in self._recalled if u.tight_until > now]

    async def _resync(self, u: LeaseUser) -> bool:
        """Set the store's leases of `u` to what this process holds (under its lock: no take between);
        not while a hand-back is on its way (it would land below the set). Whether it did."""
        async with u.lock:
            if u.returning:
                return False
            amounts = {name: h.lease for name, h in u.held.items() if h.row}
            if amounts:
                await self.leases.set_leases(self.owner, u.quota.user_id, amounts)
                u.resynced = True
        return True

    async def reassert(self) -> None:
        """Our registration was taken for dead and our leases released: put back what covers our
        reservations and unstored usage (the idle part is gone)."""
        for u in list(self._users.values()):
            amounts = {}
            for name, h in u.held.items():
                h.lease = h.reserved + h.unstored
                h.row = True
                amounts[name] = h.lease
            if amounts:
                await self.leases.set_leases(self.owner, u.quota.user_id, amounts)

    async def release_all(self) -> int:
        """At shutdown, after the recorder: everything but what covers requests not stored (and
        any still in flight) goes back. Returns what stays leased."""
        kept = 0
        for u in list(self._users.values()):
            await self.return_idle(u)
            kept += sum(h.reserved + h.unstored for h in u.held.values())
        return kept
