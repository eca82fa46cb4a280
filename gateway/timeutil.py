"""UTC time helpers: one text format so stored timestamps sort and compare as strings."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utcnow() -> datetime:
    return datetime.now(UTC)


@functools.lru_cache(maxsize=4096)  # a request's start time is formatted for its row and each event
def iso(dt: datetime) -> str:
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    # isoformat() is the same text as strftime(_FMT) up to its "+00:00" (about 4x faster than
    # strftime, and 2x faster than isoformat(timespec=...), whose keyword parsing costs as much
    # as the formatting); it leaves out a zero microsecond.
    text = dt.isoformat()
    return text[:26] + "Z" if dt.microsecond else text[:19] + ".000000Z"


def parse_iso(text: str) -> datetime:
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """Calendar month (UTC) containing `now`: the default billing period."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end
