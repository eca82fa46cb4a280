"""The store contract for the dashboard's reads, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.store import Store
from gateway.store.dashboard_base import RequestRow, Step, TrafficRow, UserRow, id_floor
from tests.test_store import record, used

pytestmark = pytest.mark.both_backends

T0 = datetime(2026, 12, 4, 10, 15, tzinfo=UTC)
CW, CW_1H, SEARCHES = "claude_cache_write_tokens", "claude_cache_write_1h_tokens", "claude_web_searches"


def rid(at: datetime, n: int = 0) -> str:
    """An id as the proxy makes them: the start's millisecond clock, then a random part."""
    return f"req_{int(at.timestamp() * 1000):012x}{n:016x}"


def test_id_floor_sorts_below_the_ids_of_later_requests() -> None:
    assert id_floor(T0) < rid(T0 - timedelta(seconds=59)) < rid(T0)
    assert id_floor(T0) > rid(T0 - timedelta(seconds=61), 2**64 - 1)


async def test_traffic_per_hour_and_day_from_since_on(store: Store) -> None:
    since = T0 - timedelta(hours=1)  # 09:15
    await store.finish_requests(
        [
            used(rid(T0), {"claude_input_tokens": 12, "claude_output_tokens": 9}, started_at=T0),
            # 100 tokens: the 1h writes are a part of the 100 writes, and searches are not tokens
            used(rid(T0, 4), {CW: 100, CW_1H: 60, SEARCHES: 3}, started_at=T0 + timedelta(minutes=20)),
            used(rid(T0, 1), {"gemini_input_tokens": 5, "gemini_images": 2}, started_at=T0 + timedelta(minutes=10)),
            record(rid(T0, 2), started_at=T0 + timedelta(minutes=50), outcome="upstream_error", status_code=529),
            # just before `since` (its id is inside the floor's slack, its start is not): left out
            used(rid(since, 3), {"claude_input_tokens": 100}, started_at=since - timedelta(seconds=30)),
            used(rid(T0 - timedelta(days=2)), {"claude_input_tokens": 100}, started_at=T0 - timedelta(days=2)),
        ]
    )
    hour = datetime(2026, 12, 4, 10, tzinfo=UTC)
    assert await store.traffic(since, Step.HOUR) == [
        TrafficRow(hour, "ok", 3, 126),
        TrafficRow(hour + timedelta(hours=1), "upstream_error", 1, 0),
    ]
    day = datetime(2026, 12, 4, tzinfo=UTC)
    assert await store.traffic(since, Step.DAY) == [
        TrafficRow(day, "ok", 3, 126),
        TrafficRow(day, "upstream_error", 1, 0),
    ]
    assert await store.traffic(T0 + timedelta(hours=2), Step.HOUR) == []


async def test_recent_requests_of_a_user_newest_first(store: Store) -> None:
    await store.finish_requests(
        [
            used(rid(T0), {"claude_input_tokens": 12}, started_at=T0, user_id="ann"),
            used(
                rid(T0, 1),
                {"claude_output_tokens": 7},
                started_at=T0 + timedelta(seconds=1),
                user_id="ann",
                estimated=True,
                model="claude-haiku",
            ),
            record(rid(T0, 2), started_at=T0 + timedelta(seconds=2), user_id="ann", outcome="timeout"),
            used(rid(T0, 3), {"claude_input_tokens": 1}, started_at=T0 + timedelta(seconds=3), user_id="ben"),
        ]
    )
    got = await store.recent_requests("ann")
    assert got == [
        RequestRow(rid(T0, 2), T0 + timedelta(seconds=2), "anthropic", "m", "timeout", None, {}, False, "none"),
        RequestRow(
            rid(T0, 1),
            T0 + timedelta(seconds=1),
            "anthropic",
            "claude-haiku",
            "ok",
            200,
            {"claude_output_tokens": 7},
            True,
            "pending",
        ),
        RequestRow(rid(T0), T0, "anthropic", "m", "ok", 200, {"claude_input_tokens": 12}, False, "pending"),
    ]
    assert [r.id for r in await store.recent_requests("ann", limit=1)] == [rid(T0, 2)]
    assert await store.recent_requests("nobody") == []


async def test_search_users_by_part_of_the_id(store: Store) -> None:
    await store.create_key("key_1", "alice", "", "pgw_a", b"h1")
    await store.create_key("key_2", "alice", "", "pgw_b", b"h2")
    await store.create_key("key_3", "malia", "", "pgw_c", b"h3")
    await store.create_key("key_4", "bob", "", "pgw_d", b"h4")
    assert await store.revoke_key("key_1")
    await store.finish_requests(
        [
            used(rid(T0), {"claude_input_tokens": 1}, started_at=T0, user_id="alice"),
            used(rid(T0, 1), {"claude_input_tokens": 1}, started_at=T0 + timedelta(hours=1), user_id="alice"),
        ]
    )
    assert await store.search_users("ali") == [
        UserRow("alice", 2, 1, T0 + timedelta(hours=1)),
        UserRow("malia", 1, 1, None),
    ]
    assert [u.user_id for u in await store.search_users("")] == ["alice", "bob", "malia"]
    assert [u.user_id for u in await store.search_users("", limit=2)] == ["alice", "bob"]
    assert await store.search_users("ALI") == []  # ids are case-sensitive
    assert await store.search_users("%") == []  # no wildcards


async def test_last_synced_at_among_requests_started_since(store: Store) -> None:
    assert await store.last_synced_at(T0) is None
    ids = [rid(T0, i) for i in range(3)]
    await store.finish_requests([used(x, {"claude_input_tokens": 1}, started_at=T0) for x in ids])
    assert await store.claim_events("A", 10, 60)
    await store.mark_retry(ids[1:2], "rejected", 0.0, max_attempts=1)
    await store.mark_deferred(ids[2:], "outage")
    assert await store.last_synced_at(T0 - timedelta(hours=1)) is None  # nothing delivered yet
    before = datetime.now(UTC)
    await store.mark_synced(ids[:1])
    last = await store.last_synced_at(T0 - timedelta(hours=1))
    assert last is not None and before - timedelta(seconds=1) <= last <= datetime.now(UTC)
    # only deliveries of requests started since the asked time count
    assert await store.last_synced_at(T0 + timedelta(seconds=1)) is None
