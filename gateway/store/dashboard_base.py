"""What the admin dashboard reads from the store (`gateway/dashboard/`): traffic over time, a user's
recent requests, users by id, and the last delivery to Polar (the backlog is `Outbox.sync_backlog`). SQL lives in
`sqlite_dashboard.py` and `postgres_dashboard.py`; both return the same rows in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol


class Step(StrEnum):
    HOUR = "hour"
    DAY = "day"


@dataclass(frozen=True, slots=True)
class TrafficRow:
    """Finished requests that started in one hour or day (UTC), with one outcome."""

    start: datetime  # the bucket's start, aware UTC
    outcome: str
    requests: int
    tokens: int  # summed over the token meters (images and searches are not tokens; a subset is counted once)


@dataclass(frozen=True, slots=True)
class RequestRow:
    id: str
    started_at: datetime
    provider: str
    model: str
    outcome: str
    status_code: int | None
    usage: dict[str, int] = field(default_factory=dict)
    estimated: bool = False
    sync_state: str = "none"


@dataclass(frozen=True, slots=True)
class UserRow:
    user_id: str
    keys: int
    active_keys: int
    last_request_at: datetime | None


def id_floor(since: datetime) -> str:
    """The least request id of a request started at `since` or later. Request ids begin with
    their millisecond clock in hex (`gateway.proxy.new_request_id`), so a range on the primary
    key finds recent requests without an index on `started_at` (which would cost every insert).
    The minute of slack covers the id and the start time being read from the clock apart."""
    ms = int((since - timedelta(minutes=1)).timestamp() * 1000)
    return f"req_{max(ms, 0):012x}"


class DashboardReads(Protocol):
    async def traffic(self, since: datetime, step: Step) -> list[TrafficRow]:
        """Finished requests started at `since` or later, per bucket and outcome, oldest first
        (then by outcome)."""
        ...

    async def recent_requests(self, user_id: str, limit: int = 50) -> list[RequestRow]:
        """The user's latest finished requests, newest first."""
        ...

    async def search_users(self, text: str, limit: int = 50) -> list[UserRow]:
        """Users (anyone who was ever issued a key) whose id contains `text` (all when empty),
        by id."""
        ...

    async def last_synced_at(self, since: datetime) -> datetime | None:
        """The latest delivery to Polar of a request started at `since` or later."""
        ...
