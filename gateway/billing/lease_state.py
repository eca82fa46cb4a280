"""What a `LeasedLedger` knows of one user's leases at this process (see `leases.py`)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from gateway.quota import UserQuota


@dataclass(slots=True)
class Held:
    """One user's meter at this process."""

    lease: int = 0  # what this owner's lease row holds, as far as this process knows
    reserved: int = 0
    unstored: int = 0  # settled here, not yet stored
    row: bool = False  # the row exists (a stored request is taken off it)

    @property
    def idle(self) -> int:
        return self.lease - self.reserved - self.unstored


@dataclass(slots=True, eq=False)
class LeaseUser:
    quota: UserQuota  # the limits view (credited, period); reserved/consumed mirror this process's
    held: dict[str, Held] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one take at a time per user here
    used_at: float = 0.0  # monotonic time of the last reservation
    tight_until: float = 0.0  # another process recalled: lease exact needs, hand back leftovers
    recall: tuple[int, float] = (0, 0.0)  # our last recall for this user: seq, monotonic time
    resynced: bool = False  # `_resync` set the row since the last `stored` of this user
    returning: int = 0  # hand-backs of this user on their way to the store
    answer: int = 0  # a recall answered while a hand-back was on its way: sent once it landed
    uncounted: dict[str, int] = field(default_factory=dict)  # settled while unlimited, not yet stored
    ends: float = -math.inf  # quota.period_end as a timestamp, for the pre-check's period test

    def uncount(self, meter: str, amount: int) -> int:
        """How much of `amount`, just stored, was settled while its meter was unlimited: never in
        `unstored`, so not to be taken off it. Counted as that first: should the stores come in
        another order than the settles, `unstored` is left high, the idle part low, never the reverse."""
        early = self.uncounted.pop(meter, 0)
        if early > amount:
            self.uncounted[meter] = early - amount
        return min(early, amount)
