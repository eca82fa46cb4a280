"""Several gateway processes on one database, each a real process driven through the official SDK.

`replicas`: three `gateway serve` processes on one PostgreSQL database (Redis where a test asks),
each with its own journal directory as on separate machines. `workers`: one `gateway serve
--workers 3` process tree on SQLite; the kernel spreads connections over its workers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from redis.asyncio import Redis

from gateway.journal import entries
from tests.conftest import REDIS_URL, GatewayProcess, process_env, run_cli, wait_until
from tests.fakes.polar import FakePolar, new_standard_secret, sign_webhook, webhook_payload
from tests.fakes.upstream import FakeUpstream, Reply
from tests.support_db import Database, Databases

MSG = [{"role": "user", "content": "Hello"}]
MODEL = "claude-sonnet-4-6"
OUTPUT = "claude_output_tokens"  # the fake answers 9 output tokens to every message
SECRET = new_standard_secret()
KINDS = ["replicas", "workers"]


@dataclass
class Cluster:
    kind: str
    db: Database
    procs: list[GatewayProcess]
    journals: list[Path]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        """Where to spread requests: every replica, or the workers' one port three times."""
        return [p.url for p in self.procs] if self.kind == "replicas" else [self.procs[0].url] * 3

    def live_processes(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM processes")[0][0])

    def issue_key(self, user_id: str) -> tuple[str, str]:
        resp = httpx.post(
            f"{self.procs[0].url}/admin/keys", json={"user_id": user_id}, headers={"authorization": "Bearer adm"}
        )
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"]), str(resp.json()["key"])


@pytest.fixture
def make_cluster(tmp_path: Path, upstream: FakeUpstream, databases: Databases) -> Iterator[Callable[..., Cluster]]:
    upstream.reset()
    made: list[Cluster] = []

    def make(kind: str, config: str = "", **env: str) -> Cluster:
        conf = tmp_path / "gateway.toml"
        if "[rate_limit]" not in config:  # out of the way unless the test is about it
            config += "\n[rate_limit]\nrequests_per_minute = 100000\ntokens_per_minute = 100000000\n"
        conf.write_text(config)
        db = databases.new("workers", backend="sqlite" if kind == "workers" else "postgres")
        n = 3 if kind == "replicas" else 1
        journals = [tmp_path / f"journal-{i}" for i in range(n)]
        base = {
            "GATEWAY_CONFIG": str(conf),
            "GATEWAY_HEARTBEAT_SECONDS": "0.5",
            "GATEWAY_HEARTBEAT_STALE_SECONDS": "2",
            "GATEWAY_DATABASE_POOL_SIZE": "4",
            **env,
        }
        args = ("--workers", "3") if kind == "workers" else ()
        procs = [
            GatewayProcess(process_env(db, upstream, GATEWAY_JOURNAL_DIR=str(j), **base), args=args) for j in journals
        ]
        if kind == "replicas":  # the schema exists before they start at once (as after `gateway migrate`)
            migrated = run_cli(procs[0].env, "migrate")
            assert migrated.returncode == 0, migrated.stderr
        for p in procs:
            p.launch()
        cluster = Cluster(kind, db, procs, journals, base)
        made.append(cluster)
        for p in procs:
            p.wait_healthy()
        wait_until(lambda: cluster.live_processes() == 3, timeout=60)  # a loaded machine starts slowly
        return cluster

    yield make
    for c in made:
        for p in c.procs:
            p.stop()


async def _spread(urls: list[str], key: str, n: int, **kw: Any) -> list[int]:
    """`n` parallel SDK requests, round-robin over `urls`; their status codes."""
    clients = [anthropic.AsyncAnthropic(base_url=f"{u}/anthropic", api_key=key, max_retries=0) for u in urls]

    async def one(c: anthropic.AsyncAnthropic) -> int:
        try:
            await c.messages.create(model=MODEL, max_tokens=kw.get("max_tokens", 9), messages=MSG)  # type: ignore[arg-type]
            return 200
        except anthropic.APIStatusError as exc:
            return exc.status_code

    try:
        return list(await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(n))))
    finally:
        for c in clients:
            await c.close()


def _one(url: str, key: str) -> int:
    """One request on a fresh connection (with workers, the kernel picks the worker)."""
    with anthropic.Anthropic(base_url=f"{url}/anthropic", api_key=key, max_retries=0) as c:
        try:
            c.messages.create(model=MODEL, max_tokens=9, messages=MSG)  # type: ignore[arg-type]
            return 200
        except anthropic.APIStatusError as exc:
            return exc.status_code


def _round(c: Cluster, key: str) -> list[int]:
    return [_one(u, key) for u in c.urls * (1 if c.kind == "replicas" else 2)]


@pytest.mark.parametrize("kind", KINDS)
async def test_parallel_requests_never_overspend_a_small_quota(make_cluster, kind: str) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = make_cluster(kind, f"[plan]\n{OUTPUT} = 90\n")  # exactly ten requests of 9 fit
    _, key = c.issue_key("quota")
    statuses = await _spread(c.urls, key, 100)
    assert set(statuses) <= {200, 402}, statuses
    served = statuses.count(200)
    assert 1 <= served <= 10
    wait_until(lambda: len(c.db.query("SELECT id FROM requests WHERE user_id = 'quota'")) == served, timeout=10)
    assert c.db.usage("quota")[OUTPUT] == 9 * served <= 90
    more = 0
    while True:  # one at a time: served until exactly the last one that fits, whoever holds leases
        status = _one(c.urls[more % 3], key)
        if status == 402:
            break
        assert status == 200
        more += 1
    assert served + more == 10
    wait_until(lambda: c.db.usage("quota").get(OUTPUT) == 90, timeout=10)


@pytest.mark.parametrize("redis", [False, True], ids=["store", "redis"])
@pytest.mark.parametrize("kind", KINDS)
async def test_rate_limit_is_exact_across_processes(  # type: ignore[no-untyped-def]
    make_cluster, upstream: FakeUpstream, kind: str, redis: bool
) -> None:
    user = f"rl-{secrets.token_hex(6)}"  # Redis is shared with other test runs
    env = {"GATEWAY_REDIS_URL": REDIS_URL} if redis else {}
    c: Cluster = make_cluster(kind, "[rate_limit]\nrequests_per_minute = 10\n", **env)
    _, key = c.issue_key(user)
    before = len(upstream.requests)
    try:
        statuses = await _spread(c.urls, key, 30)
    finally:
        if redis:
            r = Redis.from_url(REDIS_URL)
            await r.delete(f"gateway:rl:{user}")
            await r.aclose()
    assert sorted(statuses) == [200] * 10 + [429] * 20
    assert len(upstream.requests) - before == 10


@pytest.mark.parametrize("kind", KINDS)
def test_a_key_revoked_through_one_is_refused_by_all_within_a_second(make_cluster, kind: str) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = make_cluster(kind)
    key_id, key = c.issue_key("revoke")
    assert set(_round(c, key)) == {200}  # every process has the key cached
    resp = httpx.delete(f"{c.procs[-1].url}/admin/keys/{key_id}", headers={"authorization": "Bearer adm"})
    assert resp.status_code == 200
    revoked = time.monotonic()
    wait_until(lambda: set(_round(c, key)) == {401}, timeout=2)
    assert time.monotonic() - revoked < 1.0
    assert set(_round(c, key) + _round(c, key)) == {401}
    # the same through the CLI, a process of its own
    key_id, key = c.issue_key("revoke")
    assert set(_round(c, key)) == {200}
    done = run_cli(c.procs[0].env, "keys", "revoke", key_id)
    assert done.returncode == 0, done.stderr
    revoked = time.monotonic()
    wait_until(lambda: set(_round(c, key)) == {401}, timeout=2)
    assert time.monotonic() - revoked < 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_a_webhook_to_one_lifts_a_402_on_all_within_a_second(make_cluster, kind: str) -> None:  # type: ignore[no-untyped-def]
    with FakePolar() as polar:
        c: Cluster = make_cluster(
            kind,
            f"[plan]\n{OUTPUT} = 10\n",
            POLAR_ACCESS_TOKEN=polar.token,
            POLAR_BASE_URL=polar.url,
            POLAR_WEBHOOK_SECRET=SECRET,
        )
        _, key = c.issue_key("lifted")
        assert _one(c.urls[0], key) == 200
        wait_until(lambda: c.db.usage("lifted").get(OUTPUT) == 9, timeout=10)
        assert set(_round(c, key)) == {402}  # every process has seen the exhausted meter
        polar.set_state("lifted", meters={OUTPUT: (1000, 9.0)})
        body, headers = sign_webhook(
            webhook_payload("customer.state_changed", polar.state_payload("lifted")), SECRET, legacy=False
        )
        resp = httpx.post(f"{c.procs[0].url}/webhooks/polar", content=body, headers=headers)
        assert resp.status_code == 200 and resp.json()["status"] == "updated", resp.text
        lifted = time.monotonic()
        wait_until(lambda: set(_round(c, key)) == {200}, timeout=3)
        assert time.monotonic() - lifted < 1.0
        # the same delivery to another process is not applied again
        again = httpx.post(f"{c.urls[1]}/webhooks/polar", content=body, headers=headers)
        assert again.status_code == 200 and again.json()["status"] == "duplicate"


def _in_flight_owner(journals: list[Path], user_id: str) -> str:
    """The owner id (host:pid:tag) of the process that journaled `user_id`'s request in flight."""
    for d in journals:
        for seg in d.glob("*.journal"):
            for entry in entries(seg):
                if entry[0] == "B" and entry[2] == user_id:
                    return str(entry[-1])
    return ""


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_mid_stream_settles_its_request_and_leases_once(  # type: ignore[no-untyped-def]
    make_cluster, upstream: FakeUpstream, kind: str
) -> None:
    c: Cluster = make_cluster(kind, f"[plan]\n{OUTPUT} = 100000\n")
    _, key = c.issue_key("killed")
    victim = c.procs[1] if kind == "replicas" else c.procs[0]
    upstream.enqueue(Reply.fixture("anthropic/stream_text.sse", hang_after=2))
    body = {"model": MODEL, "max_tokens": 100, "messages": MSG, "stream": True}
    with httpx.stream("POST", f"{victim.url}/anthropic/v1/messages", json=body, headers={"x-api-key": key}) as r:
        next(r.iter_raw())  # the stream has started: the request is in flight
        owner = wait_until(lambda: _in_flight_owner(c.journals, "killed"))
        assert c.db.query("SELECT COUNT(*) FROM quota_leases WHERE owner = ?", owner)[0][0] == 1
        os.kill(int(owner.split(":")[1]), signal.SIGKILL)
        if kind == "replicas":
            assert victim.proc is not None
            victim.proc.wait(timeout=10)
    others = [p.url for p in c.procs if p is not victim] if kind == "replicas" else [victim.url] * 4
    assert [_one(u, key) for u in others] == [200] * len(others)  # the others keep serving
    if kind == "replicas":
        victim.start()  # on its journal directory: recovery at start settles what it left
    # (workers: the supervisor restarts the dead worker, which recovers the unlocked segment)

    def crashed() -> list[tuple[Any, ...]]:
        return c.db.query("SELECT outcome, estimated FROM requests WHERE user_id = 'killed' AND outcome = 'crashed'")

    wait_until(lambda: crashed() == [("crashed", 1)], timeout=20)
    wait_until(lambda: c.db.query("SELECT COUNT(*) FROM quota_leases WHERE owner = ?", owner) == [(0,)], timeout=20)
    assert c.db.query("SELECT COUNT(*) FROM processes WHERE owner = ?", owner) == [(0,)]
    wait_until(lambda: c.live_processes() == 3, timeout=60)
    wait_until(lambda: c.db.usage("killed").get(OUTPUT) == 100 + 9 * len(others), timeout=10)
    assert crashed() == [("crashed", 1)]  # once, though every live process looked at the dead one


@pytest.mark.parametrize("kind", KINDS)
async def test_processes_syncing_to_polar_send_every_event_once(make_cluster, kind: str) -> None:  # type: ignore[no-untyped-def]
    with FakePolar() as polar:
        c: Cluster = make_cluster(
            kind,
            POLAR_ACCESS_TOKEN=polar.token,
            POLAR_BASE_URL=polar.url,
            POLAR_WEBHOOK_SECRET=SECRET,
            GATEWAY_SYNC_INTERVAL_SECONDS="0.1",
            GATEWAY_SYNC_BATCH_SIZE="4",
        )
        _, key = c.issue_key("synced")
        statuses = await _spread(c.urls, key, 30)
        assert statuses == [200] * 30
        wait_until(lambda: len(polar.events) == 60, timeout=20)
        assert max(polar.sent.values()) == 1
        assert polar.total(OUTPUT, "synced") == 30 * 9
        wait_until(
            lambda: c.db.query("SELECT COUNT(*) FROM requests WHERE sync_state = 'synced'") == [(30,)], timeout=10
        )
