"""The store contract: every protocol method, the same answers on SQLite and PostgreSQL.

Marked `both_backends`: each test taking `store` or `db` runs on both (the outbox: test_store_outbox.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.store import Store, create_store
from gateway.store.base import CustomerLimits, MeterLimit, RequestRecord, SnapshotSource
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore
from gateway.timeutil import iso, parse_iso, utcnow
from tests.support_db import Database

YEAR = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


pytestmark = pytest.mark.both_backends


def record(rid: str, **kw: object) -> RequestRecord:
    values: dict[str, object] = {
        "id": rid,
        "user_id": "u",
        "key_id": "k",
        "provider": "anthropic",
        "model": "m",
        "operation": "messages",
        "stream": False,
        "started_at": datetime(2026, 12, 1, tzinfo=UTC),
        "reservation": {"claude_output_tokens": 10},
        **kw,
    }
    return RequestRecord(**values)  # type: ignore[arg-type]


def used(rid: str, usage: dict[str, int], **kw: object) -> RequestRecord:
    return record(rid, outcome="ok", status_code=200, usage=usage, **kw)


# ---------------------------------------------------------------------- lifecycle


def test_create_store_picks_the_backend_by_url(tmp_path: object) -> None:
    assert isinstance(create_store(f"sqlite:///{tmp_path}/x.db"), SqliteStore)
    pg = create_store("postgresql://postgres@127.0.0.1:5432/db", pool_size=3)
    assert isinstance(pg, PostgresStore) and pg.pool_size == 3
    with pytest.raises(ValueError, match="sqlite:///"):
        create_store("mysql://x")


async def test_migrate_is_idempotent(store: Store) -> None:
    assert await store.migrate() == []


async def test_two_migrators_at_once_on_a_fresh_database_apply_the_schema_once(db: Database) -> None:
    a, b = create_store(db.url, pool_size=2), create_store(db.url, pool_size=2)
    await a.open()
    await b.open()
    try:
        first, second = await asyncio.gather(a.migrate(), b.migrate())
        assert sorted([first, second], key=len)[0] == []
        applied = max(first, second, key=len)
        assert applied and applied[0] == "0001_init"
        assert db.query("SELECT COUNT(*) FROM schema_migrations") == [(len(applied),)]
        await a.finish_request(used("req_m", {"claude_output_tokens": 1}))
        assert await b.finished_ids(["req_m"]) == {"req_m"}
    finally:
        await a.close()
        await b.close()


@pytest.fixture
async def pg_store(db: Database) -> AsyncIterator[PostgresStore]:
    """A PostgreSQL store with a pool of one connection, migrated (PostgreSQL runs only)."""
    if not db.is_postgres:
        pytest.skip("PostgreSQL's own connections")
    store = create_store(db.url, pool_size=1)
    await store.open()
    try:
        await store.migrate()
        assert isinstance(store, PostgresStore)
        yield store
    finally:
        await store.close()


async def test_postgres_pool_hands_connections_back_without_a_reset_round_trip(pg_store: PostgresStore) -> None:
    await pg_store.finish_requests([used("req_w", {"claude_output_tokens": 2})])  # asyncpg learns the types
    sent: list[str] = []
    async with pg_store.pool.acquire() as conn:  # the pool's one connection
        conn.add_query_logger(lambda q: sent.append(q.query))
    await pg_store.finish_requests([used("req_r", {"claude_output_tokens": 2})])
    assert await pg_store.finished_ids(["req_r"]) == {"req_r"}
    assert [q.split()[0] for q in sent] == ["INSERT", "SELECT"], sent  # no RESET ALL after each
    # A connection released inside a transaction is still rolled back before its next use.
    async with pg_store.pool.acquire() as conn:
        await conn.execute("BEGIN")
        await conn.execute("DELETE FROM requests")
    assert await pg_store.finished_ids(["req_r"]) == {"req_r"}


def _own_socket(local_port: int) -> socket.socket | None:
    """This process's TCP socket bound to `local_port`, found through the kernel (/proc), as a duplicate."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == local_port:
                    inodes.add(fields[9])
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return socket.socket(fileno=os.dup(int(fd)))
    return None


async def test_postgres_connections_notice_a_database_that_vanished(pg_store: PostgresStore) -> None:
    """asyncpg sets no client-side keepalive: a database gone without closing its connections would leave a
    query (the recorder's, the sync's, the keeper's) waiting for ever. Every connection the store opens,
    pooled or listening, has the kernel end it within ~30 s instead; read from the kernel, not the code."""
    watch = await pg_store.watch_invalidations()  # the LISTEN connection, apart from the pool
    async with pg_store.pool.acquire() as conn:
        ports = await conn.fetch(
            "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() AND client_port > 0"
        )
    checked = 0
    for (port,) in ports:
        sock = _own_socket(port)
        if sock is None:
            continue  # (a connection of the server's own, not this process's)
        with sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        checked += 1
    assert checked >= 2, ports  # the pool's connection and the listening one
    await watch.close()


# ---------------------------------------------------------------------- keys


async def test_keys_create_list_find_revoke(store: Store) -> None:
    k2 = await store.create_key("key_2", "bob", "laptop", "pgw_bbbbbbbb", b"h2")
    k1 = await store.create_key("key_1", "alice", "", "pgw_aaaaaaaa", b"h1")
    k3 = await store.create_key("key_3", "alice", "ci", "pgw_cccccccc", b"h3")
    assert k1.created_at.tzinfo is UTC and k1.revoked_at is None
    assert await store.list_keys() == [k2, k1, k3]  # by creation time
    assert await store.list_keys("alice") == [k1, k3]
    assert await store.list_keys("nobody") == []
    assert await store.find_key(b"h1") == (k1, b"h1")
    assert await store.find_key(b"nope") is None
    assert await store.revoke_key("key_1") is True
    assert await store.revoke_key("key_1") is False  # already revoked
    assert await store.revoke_key("key_x") is False
    found = await store.find_key(b"h1")
    assert found is not None and found[0].revoked_at is not None and found[0].revoked_at.tzinfo is UTC
    assert found[0].revoked_at >= k1.created_at
    assert await store.known_users() == ["alice", "bob"]


async def test_a_duplicate_key_hash_is_refused(store: Store) -> None:
    await store.create_key("key_1", "a", "", "p", b"same")
    with pytest.raises(Exception):  # noqa: B017 (the driver's own IntegrityError / UniqueViolationError)
        await store.create_key("key_2", "b", "", "p", b"same")
    assert [k.id for k in await store.list_keys()] == ["key_1"]


async def test_known_users_sort_bytewise(store: Store) -> None:
    for i, user in enumerate(["b", "B", "a", "_x", "a"]):
        await store.create_key(f"key_{i}", user, "", "p", f"h{i}".encode())
    assert await store.known_users() == sorted({"b", "B", "a", "_x"})  # ["B", "_x", "a", "b"]


# ---------------------------------------------------------------------- requests and usage


async def test_concurrent_writes_and_a_bad_one_fails_alone(store: Store) -> None:
    good = [record(f"req_{i}", outcome="ok", usage={"claude_output_tokens": 5}) for i in range(10)]
    bad = record("req_bad", outcome="ok", user_id=None)  # NOT NULL violated
    results = await asyncio.gather(
        *(store.finish_request(r) for r in good), store.finish_request(bad), return_exceptions=True
    )
    assert all(r is None for r in results[:10])
    assert isinstance(results[10], Exception)
    assert await store.consumed("u", *YEAR) == {"claude_output_tokens": 50}


async def test_a_batch_with_a_bad_record_stores_none_of_it(store: Store) -> None:
    with pytest.raises(Exception):  # noqa: B017 (the driver's own error)
        await store.finish_requests([used("req_1", {"claude_output_tokens": 1}), record("req_2", user_id=None)])
    assert await store.finished_ids(["req_1", "req_2"]) == set()
    await store.finish_requests([])


async def test_finish_is_idempotent_and_finished_ids_tells_what_is_stored(store: Store) -> None:
    r = record("req_a", outcome="ok", usage={"claude_output_tokens": 3, "gemini_images": 2, "claude_input_tokens": 0})
    assert await store.finished_ids(["req_a", "req_b"]) == set()
    assert await store.finished_ids([]) == set()
    await store.finish_request(r)
    assert await store.finished_ids(["req_a", "req_b"]) == {"req_a"}
    expected = [("req_a:claude_output_tokens", 3), ("req_a:gemini_images:0", 1), ("req_a:gemini_images:1", 1)]
    events = await store.events_for_request("req_a")
    assert [(e.external_id, e.value) for e in events] == expected
    assert {(e.request_id, e.user_id, e.model, e.provider, e.timestamp) for e in events} == {
        ("req_a", "u", "m", "anthropic", datetime(2026, 12, 1, tzinfo=UTC))
    }
    assert await store.events_for_request("req_missing") == []
    # finishing twice (a crash recovery replayed), alone or in a batch with a new one, records nothing twice
    await store.finish_request(r)
    await store.finish_requests([r, used("req_c", {"claude_output_tokens": 1})])
    assert [(e.external_id, e.value) for e in await store.events_for_request("req_a")] == expected
    assert await store.consumed("u", *YEAR) == {"claude_output_tokens": 4, "gemini_images": 2}
    assert [(e.external_id, e.request_id) for e in await store.claim_events("o", 10, 60)] == [
        (x, "req_a") for x, _ in expected
    ] + [("req_c:claude_output_tokens", "req_c")]


def _normalized(row: dict[str, Any]) -> tuple[Any, ...]:
    """A stored row in one shape whatever the backend (text or native timestamps, JSON text or jsonb)."""

    def ts(v: Any) -> datetime:
        return parse_iso(v) if isinstance(v, str) else v

    def js(v: Any) -> Any:
        return None if v is None else orjson.loads(v)

    return (
        row["id"],
        row["user_id"],
        row["key_id"],
        row["provider"],
        row["model"],
        row["operation"],
        int(row["stream"]),
        ts(row["started_at"]),
        row["outcome"],
        js(row["reservation"]),
        row["owner"],
        ts(row["finished_at"]),
        row["status_code"],
        js(row["usage"]),
        js(row["usage_raw"]),
        int(row["estimated"]),
        row["sync_state"],
    )


@pytest.mark.parametrize("n", [1, 3, 70, 341])  # 341 = 256 + 64 + 16 + 4 + 1: every SQLite statement size
async def test_a_batch_of_any_size_goes_in_whole_with_every_column(store: Store, db: Database, n: int) -> None:
    finished = datetime(2026, 12, 1, 0, 0, 1, 500, tzinfo=UTC)
    batch = [
        used(
            f"req_{i:04d}",
            {"claude_output_tokens": i + 1},
            usage_raw={"output_tokens": i + 1, "note": "é"},
            finished_at=finished,
            stream=i % 2 == 1,
        )
        for i in range(n)
    ]
    await store.finish_requests(batch)
    await store.finish_requests(batch[: n // 2 + 1])  # a replay of some: nothing twice
    rows = [_normalized(r) for r in db.dicts("SELECT * FROM requests ORDER BY id")]
    assert rows == [
        (
            f"req_{i:04d}",
            "u",
            "k",
            "anthropic",
            "m",
            "messages",
            i % 2,
            datetime(2026, 12, 1, tzinfo=UTC),
            "ok",
            {"claude_output_tokens": 10},
            "",
            finished,
            200,
            {"claude_output_tokens": i + 1},
            {"output_tokens": i + 1, "note": "é"},
            0,
            "pending",
        )
        for i in range(n)
    ]
    assert await store.consumed("u", *YEAR) == {"claude_output_tokens": n * (n + 1) // 2}


async def test_consumed_counts_one_user_in_the_period_only(store: Store) -> None:
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    await store.finish_requests(
        [
            used("req_1", {"claude_input_tokens": 10, "claude_output_tokens": 0}, started_at=t0),
            used("req_2", {"claude_input_tokens": 5, "gemini_images": 3}, started_at=t0 + timedelta(days=30)),
            used("req_3", {"claude_input_tokens": 7}, started_at=t0 - timedelta(microseconds=1)),  # before
            used("req_4", {"claude_input_tokens": 9}, started_at=t0 + timedelta(days=31)),  # at the end: after
            used("req_5", {"claude_input_tokens": 100}, user_id="other", started_at=t0),
            record("req_6", outcome="upstream_error", started_at=t0),
        ]
    )
    end = t0 + timedelta(days=31)
    assert await store.consumed("u", t0, end) == {"claude_input_tokens": 15, "gemini_images": 3}
    assert await store.consumed("other", t0, end) == {"claude_input_tokens": 100}
    assert await store.consumed("nobody", t0, end) == {}


async def test_a_request_without_usage_has_nothing_to_sync(store: Store) -> None:
    await store.finish_request(record("req_z", outcome="upstream_error", usage={}))
    assert await store.claim_events("o", 10, 60) == []
    assert await store.usage_summary() == []


# ---------------------------------------------------------------------- limits and webhooks


def limits(user: str, snapshot: datetime, credited: int | None = 1000, **kw: Any) -> CustomerLimits:
    values: dict[str, Any] = {
        "user_id": user,
        "meters": {
            "claude_output_tokens": MeterLimit("claude_output_tokens", credited, 12.5, None),
            "claude_input_tokens": MeterLimit("claude_input_tokens", None, 0.0, 3.25),
        },
        "period_start": datetime(2026, 12, 1, tzinfo=UTC),
        "period_end": datetime(2027, 1, 1, tzinfo=UTC),
        "snapshot_at": snapshot,
        "updated_at": snapshot + timedelta(microseconds=7),
        **kw,
    }
    return CustomerLimits(**values)


async def test_limits_round_trip_and_an_older_snapshot_never_overwrites(store: Store) -> None:
    t = datetime(2026, 12, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert await store.get_limits("u") is None
    first = limits("u", t)
    assert await store.put_limits(first) is True
    got = await store.get_limits("u")
    assert got == first and list(got.meters) == list(first.meters)
    assert got.snapshot_at.tzinfo is UTC
    assert await store.put_limits(limits("u", t - timedelta(seconds=1), credited=5)) is False
    assert await store.get_limits("u") == first
    assert first.source is SnapshotSource.FETCH
    same = limits("u", t, credited=2000, period_start=None, period_end=None, active=False)
    same = dataclasses.replace(same, source=SnapshotSource.WEBHOOK)
    assert await store.put_limits(same) is True  # an equal snapshot replaces (and says where it came from)
    assert await store.get_limits("u") == same
    empty = limits("w", t, meters={})
    await store.put_limits(empty)
    assert await store.get_limits("w") == empty


async def test_stale_limit_users_oldest_first(store: Store) -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    for user, age in [("fresh", 1), ("old", 3600), ("older", 7200), ("mid", 1800)]:
        await store.put_limits(limits(user, now - timedelta(seconds=age), updated_at=now - timedelta(seconds=age)))
    cutoff = now - timedelta(seconds=60)
    assert await store.stale_limit_users(cutoff, 10) == ["older", "old", "mid"]
    assert await store.stale_limit_users(cutoff, 2) == ["older", "old"]
    assert await store.stale_limit_users(now - timedelta(days=1), 10) == []


async def test_webhook_deliveries_are_recorded_once(store: Store) -> None:
    assert await store.record_webhook("wh_1", "customer.state_changed") is True
    assert await store.record_webhook("wh_1", "customer.state_changed") is False
    assert await store.record_webhook("wh_2", "customer.state_changed") is True
    results = await asyncio.gather(*(store.record_webhook("wh_3", "x") for _ in range(5)))
    assert sorted(results) == [False] * 4 + [True]


async def test_a_forgotten_webhook_delivery_can_be_claimed_again(store: Store) -> None:
    assert await store.record_webhook("wh_f", "customer.state_changed") is True
    await store.forget_webhook("wh_f")  # its processing failed: the retry must be processed
    assert await store.record_webhook("wh_f", "customer.state_changed") is True
    await store.forget_webhook("wh_unknown")  # nothing to forget: no error


async def test_old_webhook_deliveries_are_pruned_in_batches_and_concurrently(store: Store, db: Database) -> None:
    for n in range(7):
        assert await store.record_webhook(f"wh_old_{n}", "customer.state_changed") is True
    assert await store.record_webhook("wh_new", "customer.state_changed") is True
    month_ago = utcnow() - timedelta(days=31)
    db.query(
        "UPDATE webhook_deliveries SET processed_at = ? WHERE webhook_id LIKE 'wh_old_%'",
        month_ago if db.is_postgres else iso(month_ago),
    )
    cutoff = utcnow() - timedelta(days=30)
    assert await store.prune_webhooks(cutoff, 3) == 3  # one bounded batch
    assert db.query("SELECT COUNT(*) FROM webhook_deliveries") == [(5,)]
    # Replicas pruning at once delete each row once, and none fails.
    assert sum(await asyncio.gather(*(store.prune_webhooks(cutoff, 3) for _ in range(4)))) == 4
    assert db.query("SELECT webhook_id FROM webhook_deliveries") == [("wh_new",)]
    assert await store.prune_webhooks(cutoff, 3) == 0


# ---------------------------------------------------------------------- SQLite upgrades


async def test_upgrade_from_the_first_schema_keeps_requests_and_their_sync_state(tmp_path: object) -> None:
    import sqlite3

    from gateway.store.schema import migration_scripts

    path = f"{tmp_path}/old.db"
    with sqlite3.connect(path) as old:
        old.executescript(dict(migration_scripts("sqlite"))["0001_init"])
        old.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        old.execute("INSERT INTO schema_migrations VALUES ('0001_init', '2026-11-30T00:00:00Z')")
        for rid, usage, states in [
            ("req_old", '{"claude_output_tokens": 7}', ["synced"]),
            ("req_mixed", '{"claude_input_tokens": 2, "claude_output_tokens": 3}', ["synced", "claimed"]),
            ("req_bad", '{"claude_output_tokens": 1}', ["failed"]),
        ]:
            old.execute(
                "INSERT INTO requests (id, user_id, key_id, provider, model, operation, stream, started_at, outcome,"
                " usage) VALUES (?, 'u', 'k', 'anthropic', 'm', 'messages', 0, '2026-11-30T00:00:00Z', 'ok', ?)",
                (rid, usage),
            )
            for (meter, value), state in zip(orjson.loads(usage).items(), states, strict=True):
                old.execute(
                    "INSERT INTO usage_events (external_id, request_id, user_id, meter, value, model, provider, ts,"
                    " state, last_error) VALUES (?, ?, 'u', ?, ?, 'm', 'anthropic', '2026-11-30T00:00:00Z', ?, ?)",
                    (f"{rid}:{meter}", rid, meter, value, state, "422" if state == "failed" else None),
                )
    s = SqliteStore(path)
    await s.open()
    try:
        assert await s.migrate() == [
            "0002_journal",
            "0003_consumed_from_requests",
            "0004_outbox_per_request",
            "0005_rate_windows",
            "0006_leases",
            "0007_sync_backlog",
            "0008_refusals",
            "0009_leases_by_batch",
            "0010_drop_outbox_index",
            "0011_limits_source",
            "0012_webhook_deliveries_by_age",
        ]
        assert await s.finished_ids(["req_old", "req_new"]) == {"req_old"}
        await s.finish_request(record("req_new", outcome="ok", usage={"claude_output_tokens": 5}))
        assert await s.finished_ids(["req_old", "req_new"]) == {"req_old", "req_new"}
        # the period's usage comes from the requests, old and new (2026-11-30 and 2026-12-01)
        nov, dec = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
        assert await s.consumed("u", nov, dec) == {"claude_output_tokens": 11, "claude_input_tokens": 2}
        assert (await s.consumed("u", nov, datetime(2027, 1, 1, tzinfo=UTC)))["claude_output_tokens"] == 16
        # sync state carried over per request: a partly synced request is resent whole (Polar dedups)
        claimed = await s.claim_events("o", 10, 60)
        assert sorted(e.external_id for e in claimed) == [
            "req_mixed:claude_input_tokens",
            "req_mixed:claude_output_tokens",
            "req_new:claude_output_tokens",
        ]
        assert [(e.external_id, why) for e, why in await s.failed_events()] == [("req_bad:claude_output_tokens", "422")]
    finally:
        await s.close()


def test_settings_take_a_postgres_url_and_never_show_its_password() -> None:
    from gateway.settings import ConfigError, settings_from_env

    s = settings_from_env(
        {"GATEWAY_DATABASE_URL": "postgresql://gw:hunter2@db:5432/gw", "GATEWAY_DATABASE_POOL_SIZE": "3"},
        load_file=False,
    )
    assert (s.is_postgres, s.database_pool_size, str(s.journal_path)) == (True, 3, "gateway.journal")
    assert "hunter2" not in repr(s) and "gw:***@db:5432/gw" in repr(s)
    store = create_store(s)
    assert isinstance(store, PostgresStore) and store.pool_size == 3
    with pytest.raises(ConfigError, match="must look like sqlite:///"):
        settings_from_env({"GATEWAY_DATABASE_URL": "mysql://db/gw"}, load_file=False)
    with pytest.raises(ConfigError, match="at least 1"):
        settings_from_env({"GATEWAY_DATABASE_POOL_SIZE": "0"}, load_file=False)


def test_shared_is_set_by_gateway_shared_or_implied_by_postgres() -> None:
    from gateway.settings import ConfigError, settings_from_env

    assert settings_from_env({}, load_file=False).is_shared is False
    assert settings_from_env({"GATEWAY_SHARED": "1"}, load_file=False).is_shared is True
    assert settings_from_env({"GATEWAY_SHARED": "false"}, load_file=False).is_shared is False
    pg = {"GATEWAY_DATABASE_URL": "postgresql://gw@db/gw", "GATEWAY_SHARED": "0"}
    assert settings_from_env(pg, load_file=False).is_shared is True
    with pytest.raises(ConfigError, match="GATEWAY_SHARED must be 1 or 0"):
        settings_from_env({"GATEWAY_SHARED": "maybe"}, load_file=False)
