"""Exact billing under concurrency and crashes: reservations, parallel rate limits, kill -9 recovery."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import anthropic
import httpx

from gateway.settings import RateLimitConfig
from tests.conftest import ANTHROPIC_KEY, Gateway, GatewayProcess, wait_until
from tests.fakes.upstream import FakeUpstream, Reply

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


def test_kill_9_mid_stream_is_settled_on_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    db = tmp_path / "crash.db"
    env = {
        "GATEWAY_DATABASE_URL": f"sqlite:///{db}",
        "GATEWAY_ANTHROPIC_UPSTREAM": upstream.url,
        "GATEWAY_GEMINI_UPSTREAM": upstream.url,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "GEMINI_API_KEY": "g",
        "GATEWAY_ADMIN_TOKEN": "adm",
    }
    gw = GatewayProcess(env).start()
    try:
        key = httpx.post(
            f"{gw.url}/admin/keys", json={"user_id": "crash"}, headers={"authorization": "Bearer adm"}
        ).json()["key"]
        upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", hang_after=2))
        body = {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": MSG, "stream": True}
        with httpx.stream("POST", f"{gw.url}/anthropic/v1/messages", json=body, headers={"x-api-key": key}) as r:
            next(r.iter_raw())  # the stream has started: the request is in flight
            gw.kill()

        def rows() -> list[tuple[str, int, str]]:
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT outcome, estimated, reservation FROM requests").fetchall()

        assert [r[:2] for r in rows()] == [("in_flight", 0)]
        gw = GatewayProcess(env, gw.port).start()  # recovery runs at start
        wait_until(lambda: rows()[0][0] == "crashed")
        assert rows()[0][1] == 1
        with sqlite3.connect(db) as conn:
            events = dict(conn.execute("SELECT meter, value FROM usage_events").fetchall())
        reserved = httpx.Request("POST", "http://x", json=body).content
        assert events == {"claude_input_tokens": len(reserved) // 2 + 16, "claude_output_tokens": 100}
        # a second restart settles nothing twice
        gw.stop()
        gw = GatewayProcess(env, gw.port).start()
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM usage_events").fetchone() == (2,)
    finally:
        gw.stop()
