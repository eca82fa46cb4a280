"""Exact billing under concurrency and crashes: reservations, parallel rate limits, kill -9 recovery."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx

from gateway.settings import RateLimitConfig
from tests.conftest import Gateway, GatewayProcess, process_env, wait_until
from tests.fakes.upstream import FakeUpstream, Reply
from tests.support_db import Databases

MSG = [{"role": "user", "content": "Hello"}]


async def _burst(gw: Gateway, key: str, n: int, max_tokens: int) -> list[int]:
    c = anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)

    async def one() -> int:
        try:
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=max_tokens, messages=MSG)  # type: ignore[arg-type]
            return 200
        except anthropic.APIStatusError as exc:
            return exc.status_code

    return await asyncio.gather(*(one() for _ in range(n)))


async def test_parallel_requests_never_pass_beyond_quota(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(plan={"claude_output_tokens": 90})
    key = gw.issue_key("par")
    for _ in range(50):
        upstream.enqueue(Reply.fixture("anthropic/message.json", delay_before=0.05))
    statuses = await _burst(gw, key, 50, max_tokens=9)
    assert statuses.count(200) == 10 and statuses.count(402) == 40
    gw.wait_recorded("par", 10)
    assert gw.events("par")["claude_output_tokens"] == 90
    upstream.reset()


async def test_parallel_requests_rate_limit_exact(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway(rate_limit=RateLimitConfig(requests_per_minute=10, tokens_per_minute=None))
    key = gw.issue_key("rl")
    before = len(upstream.requests)
    statuses = await _burst(gw, key, 30, max_tokens=9)
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert len(upstream.requests) - before == 10


def test_kill_9_mid_stream_is_settled_on_restart(tmp_path: Path, upstream: FakeUpstream, databases: Databases) -> None:
    db = databases.new("crash")
    journal = tmp_path / "crash.db.journal"
    env = process_env(db, upstream, GATEWAY_JOURNAL_DIR=str(journal))
    gw = GatewayProcess(env).start()
    try:
        key = gw.issue_key("crash")
        upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", hang_after=2))
        body = {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": MSG, "stream": True}
        with httpx.stream("POST", f"{gw.url}/anthropic/v1/messages", json=body, headers={"x-api-key": key}) as r:
            next(r.iter_raw())  # the stream has started: the request is in flight
            gw.kill()

        def rows(table: str, cols: str) -> list[tuple[str, ...]]:
            return db.query(f"SELECT {cols} FROM {table}")

        (segment,) = journal.iterdir()  # the request is journaled, not yet stored
        assert segment.read_bytes().count(b'["B","req_') == 1 and rows("requests", "id") == []
        gw = GatewayProcess(env, gw.port).start()  # recovery runs at start
        wait_until(lambda: rows("requests", "outcome, estimated") == [("crashed", 1)])
        assert not segment.exists()
        events = db.usage()
        reserved = httpx.Request("POST", "http://x", json=body).content
        assert events == {"claude_input_tokens": len(reserved) // 2 + 16, "claude_output_tokens": 100}
        # a second restart settles nothing twice
        gw.stop()
        gw = GatewayProcess(env, gw.port).start()
        assert db.query("SELECT COUNT(*), MIN(sync_state) FROM requests") == [(1, "pending")]
    finally:
        gw.stop()


def test_kill_9_after_the_answer_keeps_exact_usage(
    tmp_path: Path, upstream: FakeUpstream, databases: Databases
) -> None:
    """A finished request the store has not taken yet is in the journal; the next start stores it exactly."""
    db = databases.new("late")
    journal = tmp_path / "late.db.journal"
    env = process_env(
        db, upstream, GATEWAY_JOURNAL_DIR=str(journal), GATEWAY_RECORD_LINGER_SECONDS="600"
    )  # the store takes it 10 min later
    gw = GatewayProcess(env).start()
    try:
        key = gw.issue_key("late")
        c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
        msg = c.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=MSG)  # type: ignore[arg-type]
        wait_until(lambda: b'["F","req_' in b"".join(p.read_bytes() for p in journal.iterdir()))
        gw.kill()
        assert db.query("SELECT COUNT(*) FROM requests") == [(0,)]
        # `gateway usage` (like every CLI command) stores what the dead process journaled first
        cli = subprocess.run(
            [sys.executable, "-m", "gateway", "usage", "--json"], env=gw.env, capture_output=True, text=True, check=True
        )
        shown = {row["meter"]: row["total"] for row in json.loads(cli.stdout)}
        assert shown == {"claude_input_tokens": msg.usage.input_tokens, "claude_output_tokens": msg.usage.output_tokens}
        gw = GatewayProcess(env, gw.port).start()  # and the restart finds nothing left to do
        rows = db.query("SELECT outcome, estimated FROM requests")
        events = db.usage()
        assert rows == [("ok", 0)]
        assert events == {
            "claude_input_tokens": msg.usage.input_tokens,
            "claude_output_tokens": msg.usage.output_tokens,
        }
        assert list(journal.iterdir()) != [] and all(b"req_" not in p.read_bytes() for p in journal.iterdir())
    finally:
        gw.stop()


def test_sync_claims_survive_kill_9(tmp_path: Path, upstream: FakeUpstream, databases: Databases) -> None:
    from tests.fakes.polar import FakePolar

    db = databases.new("sync-crash")
    with FakePolar() as polar:
        env = process_env(
            db,
            upstream,
            GATEWAY_JOURNAL_DIR=str(tmp_path / "sync-crash.db.journal"),
            POLAR_ACCESS_TOKEN=polar.token,
            POLAR_BASE_URL=polar.url,
            GATEWAY_SYNC_INTERVAL_SECONDS="0.2",
            # (PostgreSQL: processes share the database; the dead one's claims return once it is taken for dead)
            GATEWAY_HEARTBEAT_SECONDS="0.5",
            GATEWAY_HEARTBEAT_STALE_SECONDS="2",
        )
        # Polar stores the batch, then hangs: the gateway dies before it learns the batch landed.
        polar.fail_next(1, "timeout", hold=60, commit=True, path="/v1/events/ingest")
        gw = GatewayProcess(env).start()
        try:
            key = gw.issue_key("sc")
            c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
            c.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]

            def states() -> list[str]:
                return [r[0] for r in db.query("SELECT sync_state FROM requests")]

            wait_until(lambda: len(polar.events) == 2 and states() == ["claimed"], timeout=10)
            gw.kill()
            gw = GatewayProcess(env, gw.port).start()
            wait_until(lambda: states() == ["synced"], timeout=10)
            assert polar.total("claude_input_tokens", "sc") == 12
            assert polar.total("claude_output_tokens", "sc") == 9
            assert len(polar.events) == 2  # the resend was deduplicated by external id
        finally:
            gw.stop()
