"""Refusals counted per hour (`gateway.refusals` counts them in memory and adds them here). SQL
lives in `sqlite_refusals.py` and `postgres_refusals.py`; both return the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from gateway.store.dashboard_base import Step


@dataclass(frozen=True, slots=True)
class RefusalCount:
    """Requests refused with one status and reason in one hour or day (UTC)."""

    start: datetime  # the bucket's start, aware UTC
    status: int
    reason: str
    count: int


def hour_start(dt: datetime) -> datetime:
    return dt.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


class RefusalStore(Protocol):
    async def add_refusals(self, counts: Sequence[RefusalCount]) -> None:
        """Add each count to the stored count of its hour (`start`, an hour's start), status and
        reason, all in one transaction: on an error none is added. Each key at most once."""
        ...

    async def refusals(self, since: datetime, step: Step) -> list[RefusalCount]:
        """The counts of the hours from the one holding `since` on, per hour or day, status and
        reason; oldest first, then by status and reason."""
        ...
