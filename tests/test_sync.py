"""Outbox sync against FakePolar over loopback, with the real polar-sdk and the real store."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.events import event_quantities
from gateway.meters import CLAUDE_INPUT, CLAUDE_OUTPUT, GEMINI_IMAGES
from gateway.polar.client import IngestResult, PolarBilling
from gateway.polar.commands import print_usage, run_sync
from gateway.polar.sync import Syncer
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.base import PendingEvent, RequestRecord
from gateway.timeutil import parse_iso
from tests.fakes.polar import FakePolar
from tests.support_db import Database, open_store


@pytest.fixture
async def polar(fake: FakePolar) -> AsyncIterator[PolarBilling]:
    client = PolarBilling(fake.token, base_url=fake.url, timeout=2.0, ingest_timeout=1.0)
    yield client
    await client.close()


async def add_events(
    store: Store, n: int, *, user: str = "user-1", meter: str = CLAUDE_INPUT, start: int = 0, **kw: Any
) -> dict[str, int]:
    """n requests with one event each; returns external_id -> value."""
    out: dict[str, int] = {}
    for i in range(start, start + n):
        rid = f"req_{user}_{i:05d}"
        value = kw.get("value", 100 + i)
        record = RequestRecord(
            id=rid,
            user_id=user,
            key_id="key1",
            provider="anthropic",
            model=kw.get("model", "claude-sonnet-4-5"),
            operation="messages",
            stream=False,
            started_at=kw.get("timestamp", datetime.now(UTC) - timedelta(seconds=5)),
            outcome="ok",
            status_code=200,
            usage={meter: value},
        )
        await store.finish_request(record)
        out.update({xid: v for xid, _, v in event_quantities(rid, record.usage)})
    return out


def rows(db: Database) -> dict[str, dict[str, Any]]:
    """Sync state by external id (each event carries its request's state)."""
    out: dict[str, dict[str, Any]] = {}
    for r in db.dicts("SELECT * FROM requests WHERE sync_state != 'none'"):
        for xid, _, _ in event_quantities(r["id"], json.loads(r["usage"])):
            out[xid] = {**r, "state": r["sync_state"]}
    return out


async def poll(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


def syncer(store: Store, polar: Any, **kw: Any) -> Syncer:
    kw.setdefault("owner", "test-owner")
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return Syncer(store, polar, **kw)


async def test_delivers_every_event_once_in_count_bounded_batches(
    store: Store, polar: PolarBilling, fake: FakePolar, db: Database
) -> None:
    events = await add_events(store, 20)
    result = await syncer(store, polar, batch_size=7).run_once()
    assert (result.claimed, result.synced, result.inserted, result.duplicates) == (20, 20, 20, 0)
    assert (result.batches, result.deferred, result.rejected, result.error) == (3, 0, 0, None)
    assert [len(b) for b in fake.ingest_bodies()] == [7, 7, 6]
    assert {x: e["metadata"]["value"] for x, e in fake.events.items()} == events
    assert set(fake.sent.values()) == {1}
    assert fake.total(CLAUDE_INPUT, "user-1") == sum(events.values())
    assert {r["state"] for r in rows(db).values()} == {"synced"}
    again = await syncer(store, polar, batch_size=7).run_once()
    assert (again.claimed, again.batches) == (0, 0)


async def test_batches_are_bounded_by_bytes(store: Store, polar: PolarBilling, fake: FakePolar) -> None:
    await add_events(store, 10)
    result = await syncer(store, polar, batch_size=500, max_batch_bytes=700).run_once()
    assert result.synced == 10
    sizes = [r.headers["Content-Length"] for r in fake.requests if r.path == "/v1/events/ingest"]
    assert len(sizes) > 1
    assert all(int(s) <= 700 for s in sizes)
    assert sum(len(b) for b in fake.ingest_bodies()) == 10


@pytest.mark.parametrize("refuse", [False, True], ids=["503", "connection-refused"])
async def test_polar_down_then_back_delivers_each_external_id_once(
    store: Store, polar: PolarBilling, fake: FakePolar, db: Database, refuse: bool
) -> None:
    events = await add_events(store, 12)
    s = syncer(store, polar, batch_size=5)
    fake.down(True, refuse=refuse)
    down = await s.run_once()
    assert (down.claimed, down.synced, down.deferred, down.batches) == (5, 0, 5, 1)  # stops at the first failure
    assert down.error is not None and "Polar" in down.error
    assert fake.events == {}
    fake.down(False)

    async def all_synced() -> bool:
        await s.run_once()
        return {r["state"] for r in rows(db).values()} == {"synced"}

    await poll(all_synced)
    assert sorted(fake.events) == sorted(events)
    assert fake.total(CLAUDE_INPUT) == sum(events.values())
    assert all(r["attempts"] == 0 for r in rows(db).values())  # an outage counts no attempt


async def test_timeout_after_polar_committed_is_deduplicated(store: Store, fake: FakePolar, db: Database) -> None:
    client = PolarBilling(fake.token, base_url=fake.url, ingest_timeout=0.3)
    try:
        events = await add_events(store, 4)
        fake.fail_next(1, "timeout", commit=True, hold=3.0)
        s = syncer(store, client)
        first = await s.run_once()
        assert (first.synced, first.deferred) == (0, 4)
        assert len(fake.events) == 4  # Polar stored them, we didn't hear back

        async def synced() -> bool:
            return (await s.run_once()).synced == 4 or {r["state"] for r in rows(db).values()} == {"synced"}

        await poll(synced)
        assert fake.total() == sum(events.values())
        assert set(fake.sent.values()) == {2}
        assert fake.ingest_bodies()[-1] == fake.ingest_bodies()[0]
    finally:
        await client.close()


async def test_429_retry_after_is_honoured(store: Store, polar: PolarBilling, fake: FakePolar) -> None:
    await add_events(store, 3)
    fake.fail_next(1, 429, retry_after=1)
    s = syncer(store, polar, interval=60.0)  # backoff 0.01 s: only Retry-After can hold the retry back
    stop = asyncio.Event()
    failed_at = time.monotonic()
    task = asyncio.create_task(s.run_forever(stop))
    try:
        await poll(lambda: asyncio.sleep(0, len(fake.events) == 3))
        assert time.monotonic() - failed_at >= 1.0
        assert len(fake.ingest_bodies()) == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_outage_delay_is_capped_backoff_with_jitter_and_honours_retry_after(
    store: Store, polar: PolarBilling
) -> None:
    s = Syncer(store, polar, owner="o")  # the defaults: 2 s base, 300 s cap
    for outages, low, high in [(1, 1, 2), (2, 2, 4), (3, 4, 8), (9, 150, 300), (40, 150, 300)]:
        s.outages = outages
        delays = [s.outage_delay() for _ in range(50)]
        assert all(low <= d <= high for d in delays), (outages, min(delays), max(delays))
        assert len(set(delays)) > 1  # jittered
    s.outages = 1
    assert s.outage_delay(retry_after=30) == 30
    assert s.outage_delay(retry_after=86400) == 3600  # a wild Retry-After is capped


@pytest.mark.parametrize("with_index", [True, False], ids=["indexed-422", "bisect"])
async def test_422_isolates_the_bad_event(
    store: Store, polar: PolarBilling, fake: FakePolar, db: Database, with_index: bool
) -> None:
    events = await add_events(store, 9)
    bad = sorted(events)[5]
    fake.reject_when(lambda e: "customer unknown to test" if e["external_id"] == bad else False, with_index=with_index)
    result = await syncer(store, polar, batch_size=100, max_attempts=1).run_once()
    assert (result.claimed, result.synced, result.rejected, result.parked, result.deferred) == (9, 8, 1, 1, 0)
    state = rows(db)
    assert state[bad]["state"] == "failed"
    assert "customer unknown to test" in state[bad]["last_error"]
    assert {x for x, r in state.items() if r["state"] == "synced"} == set(events) - {bad}
    assert sorted(fake.events) == sorted(set(events) - {bad})
    assert fake.total() == sum(events.values()) - events[bad]
    if with_index:
        assert result.batches == 2
    else:
        assert result.batches <= 9

    # parked events come back with requeue_failed once the cause is fixed
    fake.reject_when(None)
    assert await store.requeue_failed() == 1
    again = await syncer(store, polar).run_once()
    assert (again.claimed, again.synced, again.inserted) == (1, 1, 1)
    assert fake.total() == sum(events.values())
    assert {r["state"] for r in rows(db).values()} == {"synced"}


async def request_with(store: Store, rid: str, usage: dict[str, int]) -> None:
    await store.finish_request(
        RequestRecord(
            id=rid,
            user_id="user-1",
            key_id="key1",
            provider="gemini",
            model="gemini-2.5-flash-image",
            operation="generateContent",
            stream=False,
            started_at=datetime.now(UTC) - timedelta(seconds=5),
            outcome="ok",
            usage=usage,
        )
    )


async def test_a_request_is_synced_only_when_all_its_events_are_and_resent_whole(
    store: Store, polar: PolarBilling, fake: FakePolar, db: Database
) -> None:
    """The outbox unit is the request: one rejected event parks it, and the resend of its
    accepted events is deduplicated by Polar, so the totals stay exact."""
    await request_with(store, "req_a", {CLAUDE_INPUT: 10, CLAUDE_OUTPUT: 20, GEMINI_IMAGES: 3})
    await request_with(store, "req_b", {CLAUDE_INPUT: 1})
    fake.reject_when(lambda e: "rejected" if e["external_id"] == "req_a:gemini_images:1" else False)
    # 2 events per batch: req_a's 5 events are spread over 3 batches
    result = await syncer(store, polar, batch_size=2, max_attempts=1).run_once()
    assert (result.claimed, result.synced, result.rejected, result.parked) == (6, 5, 1, 5)
    assert {x: r["state"] for x, r in rows(db).items()} == {
        **{x: "failed" for x, _, _ in event_quantities("req_a", {CLAUDE_INPUT: 1, CLAUDE_OUTPUT: 1, GEMINI_IMAGES: 3})},
        "req_b:claude_input_tokens": "synced",
    }
    assert fake.total(CLAUDE_INPUT) == 11 and fake.total(GEMINI_IMAGES) == 2
    fake.reject_when(None)
    assert await store.requeue_failed() == 5  # events of the parked request, all resent
    again = await syncer(store, polar).run_once()
    assert (again.claimed, again.inserted, again.duplicates) == (5, 1, 4)
    assert (fake.total(CLAUDE_INPUT), fake.total(CLAUDE_OUTPUT), fake.total(GEMINI_IMAGES)) == (11, 20, 3)
    assert {r["state"] for r in rows(db).values()} == {"synced"}


async def test_polar_down_mid_request_defers_the_whole_request(
    store: Store, polar: PolarBilling, fake: FakePolar, db: Database
) -> None:
    await request_with(store, "req_a", {CLAUDE_INPUT: 10, CLAUDE_OUTPUT: 20, GEMINI_IMAGES: 2})
    # Polar stores the first batch of 2, then hangs past the client's timeout: the request's other
    # batch is never sent, and the whole request waits for a retry.
    fake.fail_next(1, "timeout", hold=3, commit=True, path="/v1/events/ingest")
    result = await syncer(store, polar, batch_size=2).run_once()
    assert (result.claimed, result.synced, result.deferred, result.batches) == (4, 0, 4, 1)
    assert {r["state"] for r in rows(db).values()} == {"pending"}
    assert len(fake.events) == 2
    await poll(lambda: _synced_after_retry(store, polar, db))
    assert (fake.total(CLAUDE_INPUT), fake.total(CLAUDE_OUTPUT), fake.total(GEMINI_IMAGES)) == (10, 20, 2)
    assert len(fake.events) == 4


async def _synced_after_retry(store: Store, polar: PolarBilling, db: Database) -> bool:
    await syncer(store, polar).run_once()
    return {r["state"] for r in rows(db).values()} == {"synced"}


async def test_future_timestamp_is_clamped_and_empty_strings_dropped(
    store: Store, polar: PolarBilling, fake: FakePolar
) -> None:
    future = datetime.now(UTC) + timedelta(hours=1)
    await add_events(store, 1, timestamp=future, model="")
    result = await syncer(store, polar).run_once()
    assert (result.synced, result.rejected) == (1, 0)
    (event,) = fake.events.values()
    assert event["metadata"] == {"value": 100, "provider": "anthropic"}
    assert event["timestamp"].endswith("Z")
    assert parse_iso(event["timestamp"]) < datetime.now(UTC)


async def test_concurrent_passes_on_one_syncer_do_not_double_send(
    store: Store, polar: PolarBilling, fake: FakePolar
) -> None:
    events = await add_events(store, 120)
    s = syncer(store, polar, batch_size=10)
    a, b = await asyncio.gather(s.run_once(), s.run_once())
    assert a.synced + b.synced == 120
    assert a.duplicates + b.duplicates == 0
    assert set(fake.sent.values()) == {1} and len(fake.sent) == 120
    assert fake.total() == sum(events.values())


async def test_two_syncers_on_the_same_database_file_do_not_double_send(
    store: Store, polar: PolarBilling, fake: FakePolar, db: Database
) -> None:
    events = await add_events(store, 150)
    other = await open_store(db.url)
    try:
        s1 = syncer(store, polar, owner="gw-1", batch_size=10)
        s2 = syncer(other, polar, owner="gw-2", batch_size=10)
        a, b = await asyncio.gather(s1.run_once(), s2.run_once())
    finally:
        await other.close()
    assert a.synced + b.synced == 150
    assert a.claimed + b.claimed == 150
    assert set(fake.sent.values()) == {1} and len(fake.sent) == 150
    assert fake.total() == sum(events.values())
    assert {r["state"] for r in rows(db).values()} == {"synced"}


async def test_a_422_parks_only_that_event_after_max_attempts(
    store: Store, polar: PolarBilling, fake: FakePolar, db: Database
) -> None:
    events = await add_events(store, 5)
    bad = sorted(events)[2]
    fake.reject_when(lambda e: "customer unknown to test" if e["external_id"] == bad else False)
    s = syncer(store, polar, max_attempts=3, backoff_base=0.0, backoff_max=0.0)
    for attempt in (1, 2, 3):
        result = await s.run_once()
        assert (result.rejected, result.parked, result.error) == (1, 1 if attempt == 3 else 0, None)
        assert (rows(db)[bad]["attempts"], rows(db)[bad]["state"]) == (
            attempt,
            "failed" if attempt == 3 else "pending",
        )
    state = rows(db)
    assert "customer unknown to test" in state[bad]["last_error"]
    assert {x for x, r in state.items() if r["state"] == "synced"} == set(events) - {bad}
    assert all(r["attempts"] == 0 for x, r in state.items() if x != bad)
    assert (await s.run_once()).claimed == 0
    assert sorted(fake.events) == sorted(set(events) - {bad})


async def test_a_rejection_waits_out_its_backoff(store: Store, polar: PolarBilling, fake: FakePolar) -> None:
    await add_events(store, 1)
    fake.reject_when(lambda e: True)
    s = syncer(store, polar, backoff_base=60.0, backoff_max=60.0)
    assert (await s.run_once()).rejected == 1
    assert (await s.run_once()).claimed == 0  # not before 30-60 s
    assert (await s.run_once(everything=True)).rejected == 1  # unless a person asks for it now


@pytest.mark.parametrize("failure", [500, 503, 429, 401, 403, 400, 404, 409, "timeout"])
async def test_an_outage_never_counts_attempts_or_parks(
    store: Store, fake: FakePolar, db: Database, failure: int | str
) -> None:
    # (a timeout well above a loaded machine's answer time: at 0.3 s the good request timed out once too)
    client = PolarBilling(fake.token, base_url=fake.url, ingest_timeout=1.0)
    try:
        events = await add_events(store, 3)
        s = syncer(store, client, max_attempts=1)
        fake.fail_next(5, failure, hold=2.5, path="/v1/events/ingest")
        for _ in range(5):
            result = await s.run_once()
            assert (result.claimed, result.deferred, result.rejected, result.parked) == (3, 3, 0, 0)
            assert result.error is not None and fake.token not in result.error
            assert {(r["state"], r["attempts"]) for r in rows(db).values()} == {("pending", 0)}
        assert s.outages == 5
        result = await s.run_once()
        assert (result.synced, s.outages) == (3, 0)
    finally:
        await client.close()
    assert fake.total() == sum(events.values())
    assert {r["state"] for r in rows(db).values()} == {"synced"}


async def test_bad_token_only_delays(store: Store, fake: FakePolar, db: Database) -> None:
    (xid,) = await add_events(store, 1)
    client = PolarBilling("polar_oat_WRONG", base_url=fake.url)
    try:
        result = await syncer(store, client, max_attempts=1).run_once()
    finally:
        await client.close()
    assert result.error is not None and "401" in result.error and "WRONG" not in result.error
    assert (rows(db)[xid]["attempts"], rows(db)[xid]["state"]) == (0, "pending")
    fixed = PolarBilling(fake.token, base_url=fake.url)
    try:
        assert (await syncer(store, fixed).run_once()).synced == 1
    finally:
        await fixed.close()


async def test_outage_with_default_settings_heals_by_itself(store: Store, fake: FakePolar, db: Database) -> None:
    """Polar failing for several backoff rounds (5xx, 429 with Retry-After, refused token): with the
    default settings every event arrives by itself, none parked, no operator action."""
    defaults = Settings()
    client = PolarBilling(fake.token, base_url=fake.url, ingest_timeout=1.0)
    events = await add_events(store, 7)
    fake.fail_next(1, 503, path="/v1/events/ingest")
    fake.fail_next(1, 429, retry_after=1, path="/v1/events/ingest")
    fake.fail_next(1, 401, path="/v1/events/ingest")
    s = Syncer(
        store,
        client,
        owner="gw",
        interval=0.2,  # only the first pass; the retries are the backoff's
        max_attempts=defaults.sync_max_attempts,
        backoff_base=defaults.sync_backoff_seconds,
        backoff_max=defaults.sync_backoff_max_seconds,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(s.run_forever(stop))
    try:
        await poll(lambda: asyncio.sleep(0, len(fake.events) == 7), within=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await client.close()
    assert len(fake.ingest_bodies()) == 4
    assert fake.total() == sum(events.values())
    assert {(r["state"], r["attempts"]) for r in rows(db).values()} == {("synced", 0)}


async def test_run_forever_wakes_on_a_full_batch_and_survives_errors(
    store: Store, polar: PolarBilling, fake: FakePolar
) -> None:
    s = syncer(store, polar, batch_size=5, interval=60.0)
    stop = asyncio.Event()
    task = asyncio.create_task(s.run_forever(stop))
    events = await add_events(store, 5)
    s.notify(4)
    await asyncio.sleep(0)
    s.notify(1)  # the fifth event fills a batch: wake long before the 60 s interval

    async def delivered() -> bool:
        return fake.total() == sum(events.values())

    await poll(delivered)

    calls: list[int] = []

    class Broken:
        async def ingest(self, events: Sequence[PendingEvent]) -> IngestResult:
            calls.append(len(events))
            raise RuntimeError("boom")

    s.polar = Broken()
    await add_events(store, 1, start=100)
    s.wake()
    await poll(lambda: asyncio.sleep(0, bool(calls)))
    assert not task.done()  # the error was logged, the loop goes on
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_cli_sync_and_usage(store: Store, fake: FakePolar) -> None:
    await add_events(store, 2, meter=CLAUDE_OUTPUT, value=10)
    await add_events(store, 1, user="user-2", meter=GEMINI_IMAGES, value=1)
    out = io.StringIO()
    assert await run_sync(Settings(), store, retry_failed=False, out=out) == 2
    assert "POLAR_ACCESS_TOKEN" in out.getvalue()

    settings = Settings(polar_access_token=fake.token, polar_base_url=fake.url)
    bad = "req_user-1_00001:claude_output_tokens"
    fake.reject_when(lambda e: e["external_id"] == bad)
    out = io.StringIO()
    assert await run_sync(settings, store, retry_failed=False, out=out) == 1
    assert f"failed {bad}" in out.getvalue()
    assert fake.token not in out.getvalue()

    out = io.StringIO()
    assert await print_usage(store, None, True, out=out) == 0
    assert json.loads(out.getvalue()) == [
        {"user_id": "user-1", "meter": CLAUDE_OUTPUT, "total": 20, "synced": 1, "pending": 0, "failed": 1},
        {"user_id": "user-2", "meter": GEMINI_IMAGES, "total": 1, "synced": 1, "pending": 0, "failed": 0},
    ]

    fake.reject_when(None)
    out = io.StringIO()
    assert await run_sync(settings, store, retry_failed=True, out=out) == 0
    assert "re-queued 1 failed event(s)" in out.getvalue()
    out = io.StringIO()
    assert await print_usage(store, "user-1", False, out=out) == 0
    assert out.getvalue().splitlines() == [
        "USER    METER                 TOTAL  SYNCED  PENDING  FAILED",
        "user-1  claude_output_tokens     20       2        0       0",
    ]


async def test_last_call_ok_follows_polar_and_backlog_counts_what_is_left(
    store: Store, polar: PolarBilling, fake: FakePolar
) -> None:
    events = await add_events(store, 4)
    s = syncer(store, polar, batch_size=100, max_attempts=1)
    assert s.last_call_ok is None  # not called yet
    fake.down(True)
    await s.run_once()
    assert s.last_call_ok is False
    backlog = await store.sync_backlog()
    assert (backlog.pending, backlog.failed) == (4, 0) and backlog.oldest_pending_at is not None
    fake.down(False)
    bad = sorted(events)[0]
    fake.reject_when(lambda e: "bad event" if e["external_id"] == bad else False, with_index=True)
    await s.run_once()
    assert s.last_call_ok is True  # a rejection is Polar answering
    backlog = await store.sync_backlog()
    assert (backlog.pending, backlog.failed, backlog.oldest_pending_at) == (0, 1, None)
