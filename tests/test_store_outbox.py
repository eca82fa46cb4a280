"""The store contract for the Polar outbox: leases, concurrent claimers, retries, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway.store import Store
from gateway.store.base import SyncBacklog, UsageSummaryRow
from gateway.store.sqlite_outbox import BACKLOG_SQL, CLAIM_SQL
from tests.support_db import Database, open_store
from tests.test_store import record, used

pytestmark = pytest.mark.both_backends


async def test_claims_are_leased_and_an_expired_lease_is_taken_over(store: Store) -> None:
    await store.finish_requests([used(f"req_{i}", {"claude_input_tokens": i + 1}) for i in range(3)])
    first = await store.claim_events("A", 2, 60)  # which two is the store's choice
    assert len(first) == 2 and all(e.attempts == 0 and e.value == int(e.request_id[-1]) + 1 for e in first)
    rest = await store.claim_events("B", 10, 60)  # A's lease holds: only the third
    assert len(rest) == 1 and {e.request_id for e in first + rest} == {"req_0", "req_1", "req_2"}
    assert await store.claim_events("B", 10, 60) == []
    # a lease that ran out (its process stopped) is taken over
    await store.finish_request(used("req_9", {"claude_output_tokens": 9}))
    assert [e.request_id for e in await store.claim_events("D", 10, -1)] == ["req_9"]
    taken = await store.claim_events("E", 10, 60)
    assert [(e.external_id, e.value) for e in taken] == [("req_9:claude_output_tokens", 9)]
    assert await store.claim_events("F", 10, 60) == []


async def test_concurrent_claimers_never_get_the_same_request(store: Store, db: Database) -> None:
    await store.finish_requests([used(f"req_{i:04d}", {"claude_input_tokens": 1}) for i in range(300)])
    other = await open_store(db.url)
    try:
        claimed: list[str] = []

        async def claimer(s: Store, owner: str) -> None:
            while events := await s.claim_events(owner, 7, 60):
                claimed.extend(e.request_id for e in events)

        await asyncio.gather(*(claimer(s, f"{s is store}-{i}") for s in (store, other) for i in range(4)))
    finally:
        await other.close()
    assert len(claimed) == 300 and len(set(claimed)) == 300


async def test_two_stores_claim_disjoint_events(store: Store, db: Database) -> None:
    other = await open_store(db.url)
    try:
        r = used("req_x", {m: 3 for m in ("claude_input_tokens", "claude_output_tokens")})
        await store.finish_request(r)
        got_a, got_b = await asyncio.gather(store.claim_events("A", 10, 60), other.claim_events("B", 10, 60))
        ids = [e.external_id for e in got_a] + [e.external_id for e in got_b]
        assert sorted(ids) == ["req_x:claude_input_tokens", "req_x:claude_output_tokens"]
    finally:
        await other.close()


async def test_claimed_events_come_in_time_order(store: Store) -> None:
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    await store.finish_requests(
        [
            used("req_b", {"gemini_images": 2}, started_at=t0 + timedelta(seconds=1)),
            used("req_a", {"claude_output_tokens": 1, "claude_input_tokens": 2}, started_at=t0 + timedelta(seconds=1)),
            used("req_c", {"claude_output_tokens": 3}, started_at=t0),
        ]
    )
    events = await store.claim_events("o", 10, 60)
    assert [e.external_id for e in events] == [
        "req_c:claude_output_tokens",
        "req_a:claude_input_tokens",
        "req_a:claude_output_tokens",
        "req_b:gemini_images:0",
        "req_b:gemini_images:1",
    ]
    assert all(e.timestamp.tzinfo is UTC and e.user_id == "u" and e.model == "m" for e in events)


async def test_events_carry_the_non_default_pricing_modifiers_of_the_raw_usage(store: Store) -> None:
    """Read from `usage_raw` at claim time: only string values that are not the standard price."""
    fast = {"output_tokens": 5, "service_tier": "priority", "speed": "fast", "inference_geo": "global"}
    raws: dict[str, object] = {
        "req_fast": fast,
        "req_geo": {"service_tier": "standard", "speed": "standard", "inference_geo": "us"},
        "req_plain": {"output_tokens": 5, "service_tier": "standard"},
        "req_none": None,
        "req_gemini": {"candidatesTokenCount": 5, "trafficType": "ON_DEMAND"},
        "req_odd": {"speed": 7, "service_tier": {"tier": "priority"}, "inference_geo": ["us"]},
        "req_long": {"speed": "f" * 600},
    }
    await store.finish_requests(
        [used(rid, {"claude_output_tokens": 5, "claude_input_tokens": 1}, usage_raw=raw) for rid, raw in raws.items()]
    )
    events = await store.claim_events("o", 20, 60)
    by_request = {e.request_id: e.modifiers for e in events}
    assert by_request == {
        "req_fast": (("service_tier", "priority"), ("speed", "fast")),
        "req_geo": (("inference_geo", "us"),),
        "req_plain": (),
        "req_none": (),
        "req_gemini": (),
        "req_odd": (),
        "req_long": (("speed", "f" * 600),),  # clamped where it is sent (`event_payload`)
    }
    # every event of a request carries them; the external ids are the usual ones
    fast_events = sorted((e.external_id, e.modifiers) for e in events if e.request_id == "req_fast")
    assert fast_events == [
        ("req_fast:claude_input_tokens", (("service_tier", "priority"), ("speed", "fast"))),
        ("req_fast:claude_output_tokens", (("service_tier", "priority"), ("speed", "fast"))),
    ]
    # and so do the parked ones the dashboard lists
    await store.mark_retry(["req_fast"], "422", 0, max_attempts=1)
    assert {e.modifiers for e, _ in await store.failed_events()} == {(("service_tier", "priority"), ("speed", "fast"))}


async def test_synced_retried_failed_and_requeued(store: Store) -> None:
    await store.finish_requests(
        [
            used("req_ok", {"claude_input_tokens": 1}),
            used("req_retry", {"claude_input_tokens": 2}),
            used("req_bad", {"gemini_images": 3}, user_id="v"),
        ]
    )
    assert len(await store.claim_events("o", 10, 60)) == 5
    await store.mark_synced(["req_ok"])
    await store.mark_synced([])
    later = 3600.0  # seconds
    await store.mark_retry(["req_retry"], "Polar server error 500", later, max_attempts=3)
    await store.mark_retry(["req_bad"], "x" * 600, later, max_attempts=1)  # parks at once
    await store.mark_retry([], "nothing", later, 3)
    assert await store.claim_events("o", 10, 60) == []  # synced, backing off, failed
    assert await store.usage_summary() == [
        UsageSummaryRow("u", "claude_input_tokens", 3, synced=1, pending=1, failed=0),
        UsageSummaryRow("v", "gemini_images", 3, synced=0, pending=0, failed=3),
    ]
    assert await store.usage_summary("v") == [UsageSummaryRow("v", "gemini_images", 3, 0, 0, 3)]
    failed = await store.failed_events()
    assert [(e.external_id, e.attempts, why) for e, why in failed] == [
        (f"req_bad:gemini_images:{i}", 1, "x" * 500) for i in range(3)
    ]
    assert len(await store.failed_events(limit=2)) == 2
    # the retry that reaches max_attempts parks the request as failed
    await store.mark_retry(["req_retry"], "again", -1.0, max_attempts=2)
    assert [(e.request_id, e.attempts, why) for e, why in await store.failed_events()] == [
        ("req_bad", 1, "x" * 500),
        ("req_bad", 1, "x" * 500),
        ("req_bad", 1, "x" * 500),
        ("req_retry", 2, "again"),
    ]
    assert await store.requeue_failed("u") == 1
    assert await store.requeue_failed() == 3
    assert await store.requeue_failed() == 0
    again = await store.claim_events("o", 10, 60)
    assert sorted((e.request_id, e.attempts) for e in again) == [("req_bad", 0)] * 3 + [("req_retry", 0)]
    await store.mark_synced(["req_bad", "req_retry"])
    await store.mark_retry(["req_ok"], "late", later, max_attempts=1)  # a synced request stays synced
    assert await store.failed_events() == []
    assert [(r.user_id, r.synced, r.pending, r.failed) for r in await store.usage_summary()] == [
        ("u", 2, 0, 0),
        ("v", 3, 0, 0),
    ]


async def test_a_retry_below_the_limit_becomes_due_again(store: Store) -> None:
    await store.finish_request(used("req_r", {"claude_input_tokens": 2}))
    await store.claim_events("o", 10, 60)
    await store.mark_retry(["req_r"], "timeout", -1.0, max_attempts=3)
    assert [(e.request_id, e.attempts) for e in await store.claim_events("o", 10, 60)] == [("req_r", 1)]


async def test_release_claims_hands_back_other_owners_claims(store: Store) -> None:
    await store.finish_requests([used(f"req_{i}", {"claude_input_tokens": 1}) for i in range(5)])
    await store.claim_events("dead-1", 2, 600)
    await store.claim_events("dead-2", 1, 600)
    await store.claim_events("me", 1, 600)
    assert await store.release_claims("me") == 3
    assert await store.release_claims("me") == 0
    assert len(await store.claim_events("other", 10, 600)) == 4  # 3 handed back + 1 never claimed; mine kept


async def test_release_owner_claims_hands_back_one_dead_owners_claims(store: Store) -> None:
    await store.finish_requests([used(f"req_{i}", {"claude_input_tokens": 1}) for i in range(4)])
    await store.claim_events("dead", 2, 600)
    await store.claim_events("alive", 1, 600)
    assert await store.release_owner_claims("dead") == 2
    assert await store.release_owner_claims("dead") == 0
    # the dead owner's 2 and the one never claimed; the live owner's claim is kept
    assert len(await store.claim_events("other", 10, 600)) == 3


async def test_usage_summary_orders_by_user_then_meter_and_counts_images_per_unit(store: Store) -> None:
    await store.finish_requests(
        [
            used("req_1", {"gemini_images": 4, "claude_output_tokens": 7}, user_id="b"),
            used("req_2", {"claude_input_tokens": 3, "claude_output_tokens": 0}, user_id="B"),
            used("req_3", {"claude_input_tokens": 5}, user_id="a"),
            record("req_4", outcome="timeout", user_id="a"),
        ]
    )
    assert await store.usage_summary() == [
        UsageSummaryRow("B", "claude_input_tokens", 3, 0, 1, 0),
        UsageSummaryRow("a", "claude_input_tokens", 5, 0, 1, 0),
        UsageSummaryRow("b", "claude_output_tokens", 7, 0, 1, 0),
        UsageSummaryRow("b", "gemini_images", 4, 0, 4, 0),
    ]
    assert await store.usage_summary("nobody") == []


async def test_a_sync_asked_for_now_takes_requests_waiting_out_their_backoff(store: Store) -> None:
    await store.finish_request(used("req_w", {"claude_input_tokens": 2}))
    await store.claim_events("o", 10, 60)
    await store.mark_retry(["req_w"], "422", 3600.0, max_attempts=3)
    assert await store.claim_events("o", 10, 60) == []
    taken = await store.claim_events("o", 10, 60, due_only=False)
    assert [(e.request_id, e.attempts) for e in taken] == [("req_w", 1)]


async def test_deferred_requests_are_pending_again_without_an_attempt(store: Store) -> None:
    await store.finish_requests([used("req_d", {"claude_input_tokens": 2}), used("req_s", {"claude_input_tokens": 1})])
    await store.claim_events("o", 10, 60)
    await store.mark_synced(["req_s"])
    await store.mark_deferred(["req_d", "req_s"], "Polar server error 503")
    again = await store.claim_events("o", 10, 60)
    assert [(e.request_id, e.attempts) for e in again] == [("req_d", 0)]  # the synced one stays synced
    assert [(r.synced, r.pending) for r in await store.usage_summary()] == [(1, 1)]


async def test_sync_backlog_counts_unsynced_requests_from_its_index(store: Store, db: Database) -> None:
    assert await store.sync_backlog() == SyncBacklog(pending=0, failed=0, oldest_pending_at=None)
    day = lambda d: datetime(2026, 12, d, tzinfo=UTC)  # noqa: E731
    out = {"claude_output_tokens": 5}
    await store.finish_requests(
        [
            used("req_1", out, started_at=day(3)),
            used("req_2", out, started_at=day(1)),
            used("req_3", out, started_at=day(2)),
            record("req_4", outcome="upstream_error", started_at=day(1)),  # no usage: nothing to sync
        ]
    )
    assert await store.sync_backlog() == SyncBacklog(pending=3, failed=0, oldest_pending_at=day(1))
    claimed = await store.claim_events("o", 1, 60)  # claimed still counts as pending
    assert await store.sync_backlog() == SyncBacklog(pending=3, failed=0, oldest_pending_at=day(1))
    await store.mark_retry([claimed[0].request_id], "422", 0.0, max_attempts=1)
    rest = await store.claim_events("o", 10, 60)
    await store.mark_synced([rest[0].request_id])
    backlog = await store.sync_backlog()
    assert (backlog.pending, backlog.failed) == (1, 1)
    assert backlog.oldest_pending_at == min(e.timestamp for e in rest[1:])
    if not db.is_postgres:
        # Cheap to poll: one covering search of the partial index of unsynced requests, no table scan.
        plan = db.query("EXPLAIN QUERY PLAN " + BACKLOG_SQL)
        assert [row[3] for row in plan] == ["SEARCH requests USING COVERING INDEX ix_requests_backlog (sync_state=?)"]
        # The claim too: a table of synced history is not read to find what is left to send.
        plan = db.query("EXPLAIN QUERY PLAN " + CLAIM_SQL, "o", "", "", "", 1)
        assert "SEARCH requests USING INDEX ix_requests_backlog (sync_state=?)" in [row[3] for row in plan]
        assert not [row[3] for row in plan if row[3].startswith("SCAN")]
