"""What the shared quota ledger needs from the store: quota leases, a process registry and an
invalidation log (`gateway/billing/leases.py`, `gateway/billing/keeper.py`). SQL lives in
`sqlite_leases.py` and `postgres_leases.py`; both follow the rules stated here.

Times one process writes and another compares (heartbeats, the log's entries) are stamped and
compared on the store's clock, never the caller's: callers pass ages in seconds, and the
PostgreSQL store turns them into instants with the server's `now()`, so replicas on hosts whose
clocks disagree still agree on who is alive. (SQLite's processes share one host, so one clock.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class InvalidationKind(StrEnum):
    LIMITS = "limits"  # subject: user id; its limits changed, reload them
    KEY = "key"  # subject: key id; revoked, forget it
    RECALL = "recall"  # subject: user id; hand back the idle part of its leases


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    meter: str
    credited: int  # from the asking process's limits view
    need: int  # the least that helps: granted in full or not at all


@dataclass(frozen=True, slots=True)
class LeaseTake:
    """What `take_lease` is asked: slices of `owner`'s share of the user's balance in [start, end)."""

    owner: str
    user_id: str
    start: datetime
    end: datetime
    asks: Sequence[LeaseAsk]
    fraction: float  # of what is available, per slice (see `slice_size`)
    recall_seq: int = 0  # a recall in progress: count the live owners yet to answer it
    stale_seconds: float = 0.0  # an owner is live when its heartbeat is younger than this (store clock)


@dataclass(slots=True)
class LeaseGrant:
    """The answer to `take_lease`: all asks granted (`granted`) or none (empty)."""

    granted: dict[str, int] = field(default_factory=dict)
    available: dict[str, int] = field(default_factory=dict)  # per meter, unleased before the grant
    others: dict[str, int] = field(default_factory=dict)  # per meter, what other owners' leases hold
    unanswered: int = 0  # live other owners holding some lease that have not answered the recall


@dataclass(frozen=True, slots=True)
class ProcessRow:
    owner: str
    host: str
    pid: int
    journal: str  # '' = no journal
    heartbeat_at: datetime


@dataclass(frozen=True, slots=True)
class Invalidation:
    seq: int
    kind: str
    subject: str


def slice_size(available: int, need: int, fraction: float) -> int:
    """How much to lease: a fraction of what is available, at least the need, at most what is
    available. Close to the limit the fraction is below the need, so slices shrink to the request."""
    return min(available, max(need, int(available * fraction)))


def grant(
    take: LeaseTake, consumed: Mapping[str, int], leased: Mapping[str, int], own: Mapping[str, int]
) -> LeaseGrant:
    """The decision inside `take_lease`'s transaction, the same for every store."""
    out = LeaseGrant()
    for ask in take.asks:
        out.available[ask.meter] = ask.credited - consumed.get(ask.meter, 0) - leased.get(ask.meter, 0)
        out.others[ask.meter] = leased.get(ask.meter, 0) - own.get(ask.meter, 0)
    if all(out.available[a.meter] >= a.need for a in take.asks):
        out.granted = {a.meter: slice_size(out.available[a.meter], a.need, take.fraction) for a in take.asks}
    return out


class QuotaLeaseStore(Protocol):
    async def take_lease(self, take: LeaseTake) -> LeaseGrant:
        """In one atomic step: available = credited - consumed in [start, end) - all leases; when
        every ask's need fits, add the slices to `owner`'s leases. With `recall_seq`, also count
        the live owners (heartbeat younger than `stale_seconds`) still holding a lease that did not answer it."""
        ...

    async def return_lease(self, owner: str, user_id: str, amounts: Mapping[str, int], answered: int = 0) -> None:
        """Hand `amounts` back from the owner's leases; mark the user's rows as having answered
        recall `answered`."""
        ...

    async def cover_lease(self, owner: str, user_id: str, amounts: Mapping[str, int]) -> None:
        """Add `amounts` to the owner's leases unconditionally: usage above a reservation is
        consumed already and must count against the balance."""
        ...

    async def set_leases(self, owner: str, user_id: str, amounts: Mapping[str, int]) -> None:
        """Put the owner's leases back to `amounts` (after it was taken for dead and released)."""
        ...

    async def lease_totals(self, user_id: str) -> dict[str, int]:
        """Every owner's leases of the user, per meter."""
        ...

    async def release_owner(self, owner: str, claim: object | None = None) -> int | None:
        """Drop a dead owner's leases and registration; returns how many lease rows went. With the
        `claim` of `claim_process`: only if the owner has not beaten since (None: it is alive after
        all, nothing is released); a heartbeat in between is its own, and its leases are in use."""
        ...


class ProcessRegistry(Protocol):
    async def register_process(self, owner: str, host: str, pid: int, journal: str) -> None: ...

    async def heartbeat(self, owner: str) -> bool:
        """Renew (stamped with the store's clock); False when the row is gone (another process
        took this one for dead)."""
        ...

    async def stale_processes(self, owner: str, stale_seconds: float) -> list[ProcessRow]:
        """Other processes whose heartbeat is more than `stale_seconds` old on the store's clock."""
        ...

    async def claim_process(self, owner: str, stale_seconds: float) -> object | None:
        """Claim a stale process for settling by renewing its heartbeat on its behalf; None when
        it is not stale (any more), else the claim (its heartbeat stamp) for `release_owner`. One
        live process at a time settles each; should that one die too, the claim goes stale and
        another takes it."""
        ...

    async def stop_process(self, owner: str, keep: bool) -> None:
        """At shutdown: deregister, or (`keep`, when leases still cover requests not stored)
        leave the row expired, for the next process to recover its journal and release it."""
        ...


class InvalidationWatch(Protocol):
    """Tells, without a round trip to the store, whether the invalidation log may have moved."""

    def mark(self) -> object | None:
        """A value that changes whenever an entry may have been added since it was last taken (by
        any process), or None when the watch cannot tell (the log must be read). Take it before
        reading the log: an entry added during the read changes the next one."""
        ...

    async def close(self) -> None: ...


class InvalidationLog(Protocol):
    async def notify_invalidation(self, kind: str, subject: str) -> int:
        """Tell every process; returns the entry's sequence number. Moves every watch's mark once
        the entry is visible."""
        ...

    async def watch_invalidations(self) -> InvalidationWatch:
        """Start watching the log for new entries (each process's keeper holds one)."""
        ...

    async def invalidations_after(self, seq: int, lookback_seconds: float) -> list[Invalidation]:
        """Entries after `seq`, and those created in the last `lookback_seconds` on the store's
        clock (a sequence number is taken before its insert commits, so a later one can be seen
        first; readers re-read a short window and skip what they saw)."""
        ...

    async def last_invalidation(self) -> int: ...
    async def prune_invalidations(self, older_than_seconds: float) -> int:
        """Drop the entries created more than `older_than_seconds` ago (store clock); how many went."""
        ...


class LeaseStore(QuotaLeaseStore, ProcessRegistry, InvalidationLog, Protocol):
    """Everything the shared ledger and its keeper use."""
