"""The small interfaces a request's billing depends on.

Each has an in-process implementation (one gateway process) and a shared one (several processes or
machines on one database, optionally Redis), chosen by the app factory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.quota import Refusal, UserQuota
from gateway.ratelimit.limiter import RateLimited
from gateway.store.base import RequestRecord


@dataclass(slots=True)
class Reservation:
    """A granted reservation, held until its request settles."""

    user_id: str
    amounts: Mapping[str, int]
    quota: UserQuota  # the in-memory view it was reserved on; settled on the same object
    period_end: datetime | None = None  # the end of the period it was reserved in (in-process ledger)


class QuotaLedger(Protocol):
    async def reserve(self, user_id: str, amounts: Mapping[str, int]) -> Reservation | Refusal:
        """Check and reserve in one step: parallel requests never pass on the same balance."""
        ...

    def reserve_held(self, user_id: str, amounts: Mapping[str, int]) -> Reservation | Refusal | None:
        """`reserve` from what this process holds, without the store; None when the store must be asked."""
        ...

    def settle(self, reservation: Reservation, actual: Mapping[str, int]) -> None:
        """The request ended: its reservation becomes `actual` consumption (not yet stored)."""
        ...

    def stored(self, records: Sequence[RequestRecord]) -> None:
        """These finished requests are now in the store (their usage counts there from now on)."""
        ...

    async def snapshot(self, user_id: str) -> UserQuota:
        """The user's credited, consumed and reserved per meter, for the status endpoint."""
        ...

    def invalidate(self, user_id: str) -> None:
        """The user's limits changed: reload them before the next reservation."""
        ...


class RateLimit(Protocol):
    async def acquire(self, user_id: str, tokens: int) -> tuple[RateLimited | None, object | None]:
        """Admit one request with an estimated token cost, or say when to retry. Returns (refusal, ticket)."""
        ...

    def settle(self, user_id: str, ticket: object | None, actual_tokens: int) -> None:
        """Correct the admitted estimate to the actual tokens (shared implementations do it in the background)."""
        ...
