"""The two stores give the same answers: batches with duplicates and of 20,000, counts beyond 32 bits,
period bounds, text, ties, migrations that race, fail halfway, or upgrade the first schema."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.store import Store
from gateway.store.base import CustomerLimits, MeterLimit
from gateway.store.dashboard_base import Step
from gateway.store.leases_base import LeaseAsk, LeaseTake
from gateway.store.refusals_base import RefusalCount
from tests.support_db import Database
from tests.test_store import used

pytestmark = pytest.mark.both_backends

YEAR = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
BIG = 3 * 2**31 + 7  # beyond a 32-bit integer


async def test_duplicate_id_within_one_batch_is_stored_and_settled_once(store: Store) -> None:
    await store.cover_lease("o", "u", {"claude_output_tokens": 100})
    r = used("req_d", {"claude_output_tokens": 10}, owner="o")
    await store.finish_requests([r, r, used("req_e", {"claude_output_tokens": 1}, owner="o")])
    assert await store.finished_ids(["req_d", "req_e"]) == {"req_d", "req_e"}
    assert await store.consumed("u", *YEAR) == {"claude_output_tokens": 11}
    assert await store.lease_totals("u") == {"claude_output_tokens": 89}
    events = await store.claim_events("c", 10, 60)
    assert [e.external_id for e in events] == ["req_d:claude_output_tokens", "req_e:claude_output_tokens"]


async def test_token_counts_beyond_32_bits(store: Store) -> None:
    await store.cover_lease("o", "u", {"claude_input_tokens": 2 * BIG})
    await store.finish_requests([used("req_big", {"claude_input_tokens": BIG}, owner="o")])
    assert await store.consumed("u", *YEAR) == {"claude_input_tokens": BIG}
    assert await store.lease_totals("u") == {"claude_input_tokens": BIG}
    rows = await store.usage_summary("u")
    assert [(r.meter, r.total, r.pending) for r in rows] == [("claude_input_tokens", BIG, 1)]
    await store.return_lease("o", "u", {"claude_input_tokens": BIG}, answered=BIG)
    await store.set_leases("o", "u", {"claude_input_tokens": BIG})
    assert await store.lease_totals("u") == {"claude_input_tokens": BIG}
    take = LeaseTake("p", "u", *YEAR, [LeaseAsk("claude_input_tokens", 4 * BIG, 1)], 0.5)
    got = await store.take_lease(take)
    assert got.available == {"claude_input_tokens": 2 * BIG}
    traffic = await store.traffic(datetime(2026, 11, 30, tzinfo=UTC), Step.DAY)
    assert [(t.requests, t.tokens) for t in traffic] == [(1, BIG)]
    recent = await store.recent_requests("u")
    assert recent[0].usage == {"claude_input_tokens": BIG}


async def test_refusal_counts_beyond_32_bits(store: Store) -> None:
    hour = datetime(2026, 12, 1, 5, tzinfo=UTC)
    await store.add_refusals([RefusalCount(hour, 429, "rate", BIG)])
    await store.add_refusals([RefusalCount(hour, 429, "rate", BIG)])
    got = await store.refusals(hour - timedelta(minutes=30), Step.HOUR)
    assert [(g.start, g.status, g.reason, g.count) for g in got] == [(hour, 429, "rate", 2 * BIG)]


async def test_consumed_period_start_inclusive_end_exclusive(store: Store) -> None:
    t = datetime(2026, 12, 1, 12, 0, 0, 0, tzinfo=UTC)
    await store.finish_requests(
        [
            used("req_1", {"claude_input_tokens": 1}, started_at=t),
            used("req_2", {"claude_input_tokens": 10}, started_at=t + timedelta(hours=1)),
            used("req_3", {"claude_input_tokens": 100}, started_at=t + timedelta(hours=1, microseconds=-1)),
            used("req_4", {"claude_input_tokens": 1000}, started_at=t - timedelta(microseconds=1)),
        ]
    )
    assert await store.consumed("u", t, t + timedelta(hours=1)) == {"claude_input_tokens": 101}
    # the same instants given in another time zone
    plus2 = timezone(timedelta(hours=2))
    assert await store.consumed("u", t.astimezone(plus2), (t + timedelta(hours=1)).astimezone(plus2)) == {
        "claude_input_tokens": 101
    }
    assert await store.consumed("u", t, t) == {}


async def test_text_with_quotes_and_unicode_round_trips_and_sorts_alike(store: Store) -> None:
    users = ["u'x\"", "é", "Z", "a", "ü;--", "😀", "A b"]
    for i, u in enumerate(users):
        await store.create_key(f"k{i}", u, "n'\"é", "p", bytes([i]))
    assert await store.known_users() == sorted(users, key=lambda s: s.encode())
    found = await store.search_users("")
    assert [r.user_id for r in found] == sorted(users, key=lambda s: s.encode())
    assert [r.user_id for r in await store.search_users("'")] == ["u'x\""]
    keys = await store.list_keys("é")
    assert [(k.id, k.name) for k in keys] == [("k1", "n'\"é")]


async def test_limit_ties_and_zero(store: Store) -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    for u in ("b", "a", "c"):
        await store.put_limits(CustomerLimits(u, {"m": MeterLimit("m", BIG)}, None, None, now, now))
    assert await store.stale_limit_users(now + timedelta(seconds=1), 2) == ["a", "b"]
    assert await store.stale_limit_users(now + timedelta(seconds=1), 0) == []
    got = await store.get_limits("a")
    assert got is not None and got.meters["m"].credited == BIG and got.period_start is None


async def test_claim_limit_counts_requests(store: Store) -> None:
    await store.finish_requests([used(f"req_{i}", {"claude_input_tokens": 1, "gemini_images": 2}) for i in range(5)])
    got = await store.claim_events("c", 2, 60)
    assert len({e.request_id for e in got}) == 2 and len(got) == 6
    assert await store.claim_events("c", 0, 60) == []


async def test_requeue_then_claim_is_due_at_once(store: Store) -> None:
    await store.finish_requests([used("req_1", {"claude_input_tokens": 1})])
    await store.claim_events("c", 10, 60)
    await store.mark_retry(["req_1"], "bad", 3600.0, 1)
    assert (await store.sync_backlog()).failed == 1
    assert await store.requeue_failed() == 1
    assert [e.request_id for e in await store.claim_events("c", 10, 60)] == ["req_1"]


async def test_a_large_batch(store: Store) -> None:
    n = 20_000
    batch = [used(f"req_{i:06d}", {"claude_input_tokens": 1}) for i in range(n)]
    await store.finish_requests(batch)
    ids = [r.id for r in batch]
    assert len(await store.finished_ids(ids)) == n
    await store.mark_synced(ids)
    assert (await store.sync_backlog()).pending == 0
    assert await store.consumed("u", *YEAR) == {"claude_input_tokens": n}


async def test_two_migrators_on_fresh_database_many_times(db: Database) -> None:
    from gateway.store import create_store

    stores = [create_store(db.url, pool_size=2) for _ in range(3)]
    for s in stores:
        await s.open()
    try:
        results = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(len(r) for r in results)[:2] == [0, 0]
    finally:
        for s in stores:
            await s.close()


async def test_rate_windows_take_tokens_beyond_32_bits(store: Store, db: Database) -> None:
    from gateway.ratelimit.budget import Grant, Want

    got = await store.rate_take("u", Want(1, BIG, BIG, None, None), 1_000_000.5, None)
    assert isinstance(got, Grant) and got.tokens == BIG
    await store.rate_correct([("u", got.second, 0, BIG)])
    got2 = await store.rate_take("u", Want(1, 5, 5, None, 10 * BIG), 1_000_000.7, None)
    assert isinstance(got2, Grant) and got2.room == 10 * BIG - 2 * BIG


async def test_a_migration_failing_halfway_leaves_nothing_applied(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.store import create_store, postgres_base, sqlite_base
    from gateway.store.schema import migration_scripts

    dialect = "postgres" if db.is_postgres else "sqlite"
    real = migration_scripts(dialect)
    broken = [
        *real,
        ("9998_ok", "CREATE TABLE review_a (x INTEGER)"),
        ("9999_bad", "CREATE TABLE review_b (x INTEGER);\nSELECT * FROM no_such_table"),
    ]
    monkeypatch.setattr(sqlite_base if dialect == "sqlite" else postgres_base, "migration_scripts", lambda _: broken)
    s = create_store(db.url, pool_size=2)
    await s.open()
    try:
        with pytest.raises(Exception):  # noqa: B017
            await s.migrate()
        # nothing of the failed run is left: no table, no version; the next run applies everything
        monkeypatch.setattr(sqlite_base if dialect == "sqlite" else postgres_base, "migration_scripts", lambda _: real)
        assert len(await s.migrate()) == len(real)
    finally:
        await s.close()
    assert db.query("SELECT COUNT(*) FROM schema_migrations") == [(len(real),)]


async def test_upgrading_a_first_schema_database_bills_what_it_left_in_flight(tmp_path: object) -> None:
    """A 0001-era process that was killed left rows in `in_flight`; that version settled them at its
    next start (billed by estimate). Upgrading instead must not drop them unbilled."""
    import sqlite3

    from gateway.store.schema import migration_scripts
    from gateway.store.sqlite import SqliteStore

    path = f"{tmp_path}/old.db"
    with sqlite3.connect(path) as old:
        old.executescript(dict(migration_scripts("sqlite"))["0001_init"])
        old.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        old.execute("INSERT INTO schema_migrations VALUES ('0001_init', '2026-11-30T00:00:00Z')")
        old.execute(
            "INSERT INTO in_flight (id, user_id, key_id, provider, model, operation, stream, started_at,"
            " reservation, owner) VALUES ('req_fly', 'u', 'k', 'anthropic', 'm', 'messages', 1,"
            " '2026-11-30T00:00:00.000000Z', ?, 'dead-owner')",
            ('{"claude_input_tokens": 100, "claude_cache_read_tokens": 100, "claude_output_tokens": 50}',),
        )
    s = SqliteStore(path)
    await s.open()
    try:
        await s.migrate()
        assert await s.finished_ids(["req_fly"]) == {"req_fly"}
        nov, dec = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
        assert await s.consumed("u", nov, dec) == {"claude_input_tokens": 100, "claude_output_tokens": 50}
        assert sorted(e.external_id for e in await s.claim_events("o", 10, 60)) == [
            "req_fly:claude_input_tokens",
            "req_fly:claude_output_tokens",
        ]
    finally:
        await s.close()
