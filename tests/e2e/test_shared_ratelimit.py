"""Rate limits exact across gateway processes: replicas on Redis, workers sharing one SQLite file."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import anthropic
from redis.asyncio import Redis

from gateway.settings import RateLimitConfig
from tests.conftest import REDIS_URL, Gateway
from tests.fakes.upstream import FakeUpstream

MSG = [{"role": "user", "content": "Hello"}]
TEN_PER_MINUTE = RateLimitConfig(requests_per_minute=10, tokens_per_minute=None)


async def _spread(gateways: list[Gateway], keys: list[str], n: int) -> list[int]:
    """`n` parallel requests of the SDK, round-robin over the gateways; their status codes."""
    clients = [
        anthropic.AsyncAnthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
        for gw, key in zip(gateways, keys, strict=True)
    ]

    async def one(c: anthropic.AsyncAnthropic) -> int:
        try:
            await c.messages.create(model="claude-sonnet-4-6", max_tokens=9, messages=MSG)  # type: ignore[arg-type]
            return 200
        except anthropic.RateLimitError as exc:
            assert exc.response.headers["retry-after"] in {"59", "60"}
            return 429
        except anthropic.APIStatusError as exc:
            return exc.status_code

    return await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(n)))


async def test_replicas_on_redis_let_exactly_ten_of_thirty_through(make_gateway, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    user = f"rl-{secrets.token_hex(6)}"  # Redis is shared with other test runs
    replicas: list[Gateway] = [make_gateway(rate_limit=TEN_PER_MINUTE, redis_url=REDIS_URL) for _ in range(2)]
    keys = [gw.issue_key(user) for gw in replicas]
    before = len(upstream.requests)
    try:
        statuses = await _spread(replicas, keys, 30)
    finally:
        r = Redis.from_url(REDIS_URL)
        await r.delete(f"gateway:rl:{user}")
        await r.aclose()
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert len(upstream.requests) - before == 10


async def test_workers_on_one_sqlite_file_let_exactly_ten_of_thirty_through(  # type: ignore[no-untyped-def]
    make_gateway, upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "workers.db"
    workers: list[Gateway] = [
        make_gateway(
            rate_limit=TEN_PER_MINUTE,
            shared=True,
            database_url=f"sqlite:///{db}",
            journal_dir=str(tmp_path / f"journal-{i}"),
        )
        for i in range(3)
    ]
    key = workers[0].issue_key("workers")  # one database: one key serves every worker
    before = len(upstream.requests)
    statuses = await _spread(workers, [key] * 3, 30)
    assert statuses.count(200) == 10 and statuses.count(429) == 20
    assert len(upstream.requests) - before == 10
    assert workers[0].query("SELECT sum(requests) FROM rate_windows WHERE user_id = 'workers'") == [(10,)]
