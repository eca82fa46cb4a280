"""UTC time helpers: one text format so stored timestamps sort and compare as strings."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

# A monotonic clock that also counts time the machine was suspended (CLOCK_BOOTTIME on Linux;
# elsewhere `time.monotonic`). For deadlines other processes judge by their own clocks, which ran on
# while this machine slept: a quota-lease fence, the end of a rate-limit slice's second.
suspend_clock: Callable[[], float] = (
    functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
)


def utcnow() -> datetime:
    return datetime.now(UTC)


_D3 = tuple(f"{n:03d}" for n in range(1000))  # the microseconds as two lookups: no format spec to parse
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = (_EPOCH, _EPOCH, "")  # the second last stamped: [start, end) and its text up to the microseconds


def stamp() -> tuple[datetime, str]:
    """The time now and its `iso` text, from one clock read. For the times a request's record
    carries: formatting here skips `iso`'s cache, whose key (hashing an aware datetime) costs
    more than the text."""
    global _SECOND
    now = datetime.now(UTC)
    start, end, prefix = _SECOND
    if not start <= now < end:
        start = now.replace(microsecond=0)
        prefix = iso(start)[:-7]
        _SECOND = (start, start + timedelta(seconds=1), prefix)  # one tuple: threads see it whole
    us = now.microsecond
    return now, f"{prefix}{_D3[us // 1000]}{_D3[us % 1000]}Z"


_SECONDS: dict[tuple[int, int, int, int, int, int], str] = {}  # the text up to the microseconds, per second


@functools.lru_cache(maxsize=4096)  # a request's start time is formatted for its row and each event
def iso(dt: datetime) -> str:
    if dt.tzinfo is not UTC:
        dt = dt.astimezone(UTC)
    # Timestamps come a few thousand per second: format each second once and add the microseconds
    # (half the cost of isoformat(), whose C formatting goes through printf per field).
    key = (dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second)
    prefix = _SECONDS.get(key)
    if prefix is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        y, mo, d, h, mi, sec = key
        prefix = _SECONDS[key] = f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{sec:02d}."
    return f"{prefix}{dt.microsecond:06d}Z"


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
