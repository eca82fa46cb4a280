from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from gateway import timeutil
from gateway.timeutil import iso, parse_iso, stamp


def test_iso_is_fixed_width_utc_with_microseconds() -> None:
    assert iso(datetime(2026, 12, 2, 8, 5, 9, 123456, tzinfo=UTC)) == "2026-12-02T08:05:09.123456Z"
    assert iso(datetime(2026, 12, 2, 8, 5, 9, 7, tzinfo=UTC)) == "2026-12-02T08:05:09.000007Z"
    # isoformat() leaves out a zero microsecond: the text must keep its width so it sorts as a string
    assert iso(datetime(2026, 12, 2, 8, 5, 9, tzinfo=UTC)) == "2026-12-02T08:05:09.000000Z"


def test_iso_converts_other_zones_to_utc() -> None:
    plus5 = timezone(timedelta(hours=5))
    assert iso(datetime(2026, 12, 2, 3, 0, 0, 500000, tzinfo=plus5)) == "2026-12-01T22:00:00.500000Z"


def test_iso_round_trips() -> None:
    dt = datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=UTC)
    assert parse_iso(iso(dt)) == dt


def test_stamp_is_its_time_and_that_time_as_iso(monkeypatch: pytest.MonkeyPatch) -> None:
    times = [
        datetime(2026, 12, 2, 8, 5, 9, 7, tzinfo=UTC),
        datetime(2026, 12, 2, 8, 5, 9, 999999, tzinfo=UTC),
        datetime(2026, 12, 2, 8, 5, 10, tzinfo=UTC),  # the next second: its text is made anew
        datetime(2026, 12, 3, 8, 5, 10, 120034, tzinfo=UTC),  # the same time of another day
        datetime(2026, 12, 2, 8, 5, 9, 500000, tzinfo=UTC),  # the clock stepped back
    ]
    clock = iter(times)
    monkeypatch.setattr(timeutil, "datetime", SimpleNamespace(now=lambda tz: next(clock)))
    assert [stamp() for _ in times] == [(t, iso(t)) for t in times]


def test_stamp_reads_the_clock() -> None:
    for _ in range(1000):
        now, text = stamp()
        assert text == iso(now) and parse_iso(text) == now
