from datetime import UTC, datetime, timedelta, timezone

from gateway.timeutil import iso, parse_iso


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
