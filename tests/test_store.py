"""The SQLite store: a failing write fails alone, idempotent finishes, migrations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson
import pytest

from gateway.store.base import RequestRecord, SyncBacklog
from gateway.store.sqlite import SqliteStore
from gateway.store.sqlite_outbox import BACKLOG_SQL


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


async def test_concurrent_writes_and_a_bad_one_fails_alone(store: SqliteStore) -> None:
    good = [record(f"req_{i}", outcome="ok", usage={"claude_output_tokens": 5}) for i in range(10)]
    bad = record("req_bad", outcome="ok", user_id=None)  # NOT NULL violated
    results = await asyncio.gather(
        *(store.finish_request(r) for r in good), store.finish_request(bad), return_exceptions=True
    )
    assert all(r is None for r in results[:10])
    assert isinstance(results[10], Exception)
    assert await store.consumed("u", datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)) == {
        "claude_output_tokens": 50
    }


async def test_finish_is_idempotent_and_finished_ids_tells_what_is_stored(store: SqliteStore) -> None:
    r = record("req_a", outcome="ok", usage={"claude_output_tokens": 3, "gemini_images": 2, "claude_input_tokens": 0})
    assert await store.finished_ids(["req_a", "req_b"]) == set()
    await store.finish_request(r)
    assert await store.finished_ids(["req_a", "req_b"]) == {"req_a"}
    expected = [("req_a:claude_output_tokens", 3), ("req_a:gemini_images:0", 1), ("req_a:gemini_images:1", 1)]
    assert [(e.external_id, e.value) for e in await store.events_for_request("req_a")] == expected
    # finishing twice (a crash recovery replayed) records nothing twice
    await store.finish_request(r)
    assert [(e.external_id, e.value) for e in await store.events_for_request("req_a")] == expected
    assert [(e.external_id, e.request_id) for e in await store.claim_events("o", 10, 60)] == [
        (x, "req_a") for x, _ in expected
    ]


@pytest.mark.parametrize("n", [1, 3, 70, 341])  # 341 = 256 + 64 + 16 + 4 + 1: every statement size
async def test_a_batch_of_any_size_goes_in_whole_with_every_column(store: SqliteStore, n: int) -> None:
    finished = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    batch = [
        record(
            f"req_{i:04d}",
            outcome="ok",
            status_code=200,
            usage={"claude_output_tokens": i + 1},
            usage_raw={"output_tokens": i + 1, "note": "é"},
            finished_at=finished,
        )
        for i in range(n)
    ]
    await store.finish_requests(batch)
    await store.finish_requests(batch[: n // 2 + 1])  # a replay of some: nothing twice
    rows = await store.db.execute_fetchall(
        "SELECT id, user_id, key_id, provider, model, operation, stream, started_at, outcome, reservation, owner,"
        " finished_at, status_code, usage, usage_raw, estimated, sync_state FROM requests ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (
            f"req_{i:04d}",
            "u",
            "k",
            "anthropic",
            "m",
            "messages",
            0,
            "2026-12-01T00:00:00.000000Z",
            "ok",
            '{"claude_output_tokens":10}',
            "",
            "2026-12-01T00:00:01.000000Z",
            200,
            f'{{"claude_output_tokens":{i + 1}}}',
            f'{{"output_tokens":{i + 1},"note":"é"}}',
            0,
            "pending",
        )
        for i in range(n)
    ]
    total = await store.consumed("u", datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert total == {"claude_output_tokens": n * (n + 1) // 2}


async def test_a_request_without_usage_has_nothing_to_sync(store: SqliteStore) -> None:
    await store.finish_request(record("req_z", outcome="upstream_error", usage={}))
    assert await store.claim_events("o", 10, 60) == []
    assert await store.usage_summary() == []


async def test_migrate_is_idempotent(store: SqliteStore) -> None:
    assert await store.migrate() == []


@pytest.mark.parametrize("n", [1, 3])
async def test_two_stores_on_one_file_claim_disjoint_events(tmp_path: object, n: int) -> None:
    path = f"{tmp_path}/two.db"
    a, b = SqliteStore(path), SqliteStore(path)
    for s in (a, b):
        await s.open()
        await s.migrate()
    try:
        r = record("req_x", outcome="ok", usage={m: n for m in ("claude_input_tokens", "claude_output_tokens")})
        await a.finish_request(r)
        got_a, got_b = await asyncio.gather(a.claim_events("A", 10, 60), b.claim_events("B", 10, 60))
        ids = [e.external_id for e in got_a] + [e.external_id for e in got_b]
        assert sorted(ids) == ["req_x:claude_input_tokens", "req_x:claude_output_tokens"]
    finally:
        await a.close()
        await b.close()


async def test_upgrade_from_the_first_schema_keeps_requests_and_their_sync_state(tmp_path: object) -> None:
    import sqlite3

    from gateway.store.sqlite_base import migrations_dir

    path = f"{tmp_path}/old.db"
    with sqlite3.connect(path) as old:
        old.executescript((migrations_dir("sqlite") / "0001_init.sql").read_text())
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
            "0006_rate_windows",
            "0007_sync_backlog",
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


async def test_sync_backlog_counts_unsynced_requests_from_its_index(store: SqliteStore) -> None:
    assert await store.sync_backlog() == SyncBacklog(pending=0, failed=0, oldest_pending_at=None)
    usage = {"claude_output_tokens": 5}
    day = lambda d: datetime(2026, 12, d, tzinfo=UTC)  # noqa: E731
    await store.finish_requests(
        [
            record("req_1", outcome="ok", usage=usage, started_at=day(3)),
            record("req_2", outcome="ok", usage=usage, started_at=day(1)),
            record("req_3", outcome="ok", usage=usage, started_at=day(2)),
            record("req_4", outcome="upstream_error", started_at=day(1)),  # no usage: nothing to sync
        ]
    )
    assert await store.sync_backlog() == SyncBacklog(pending=3, failed=0, oldest_pending_at=day(1))
    claimed = await store.claim_events("o", 1, 60)  # claimed still counts as pending
    assert await store.sync_backlog() == SyncBacklog(pending=3, failed=0, oldest_pending_at=day(1))
    await store.mark_retry([claimed[0].request_id], "422", day(1), max_attempts=1)
    rest = await store.claim_events("o", 10, 60)
    await store.mark_synced([rest[0].request_id])
    backlog = await store.sync_backlog()
    assert (backlog.pending, backlog.failed) == (1, 1)
    # Cheap to poll: one covering search of the partial index of unsynced requests, no table scan.
    plan = await store.db.execute_fetchall("EXPLAIN QUERY PLAN " + BACKLOG_SQL)
    assert [row[3] for row in plan] == ["SEARCH requests USING COVERING INDEX ix_requests_backlog (sync_state=?)"]
