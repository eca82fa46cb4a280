"""The gateway's own cost per request, without sockets: its ASGI app driven in-process.

    python bench/pipeline.py [--cells anthropic_json@16,...] [--requests 12000] [--rounds 3] [--profile]
    python bench/pipeline.py --instructions [--tree ../other-checkout]   # under callgrind: deterministic
    python bench/pipeline.py --events 31   # streams stretched to 31 events (the fixtures are short)
    python bench/pipeline.py --store shared --memory-limiter   # shared mode on SQLite (postgres: PostgreSQL)

`bench/run.py` measures the whole stack, where uvicorn, aiohttp and the kernel's loopback are most
of the cost and a shared machine moves the numbers by +-20 %. This drives `create_app(settings)`
directly, 16 requests at a time, with the upstream client replaced by one that answers the
recorded fixtures from memory: what is left is authentication, pre-checks, metering, the journal
and the store (whose writer thread counts too: CPU time is the process's). It prints the CPU time
per request (the minimum over rounds is the least disturbed) and checks that the recorded meter
totals equal requests x the fixture's usage. `--profile` adds the top functions by own time.

`--instructions` counts instead of timing: it runs the measurement under callgrind at two sizes and
prints the difference per request (start-up and warm-up cancel out), which repeats to within a few
hundred instructions, so a change worth 1 % shows. `--tree PATH` measures the gateway package of
another checkout (a `git worktree` of another commit, or one with a part of the billing work cut
out to see what that part costs).

`--store shared` runs the gateway as one of several processes on its SQLite file would (leased
quota, lease keeper), `--store postgres` on a fresh PostgreSQL database (the server's own CPU is
not counted); `--memory-limiter` keeps their rate limits in memory (see harness/site), so
what differs from `--store sqlite` is shared mode's other work. `--no-timers` stretches the keeper's
poll and heartbeat to an hour: under callgrind timers fire at wall-clock rate while requests run
~50x slower, so their share per request would show ~50x too large (bench/instructions.py --idle
counts them apart).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import logging
import os
import pstats
import runpy
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The gateway package measured: this checkout's, or --tree's (set for the child processes).
sys.path.insert(0, os.environ.get("PIPELINE_GATEWAY_ROOT") or str(Path(__file__).resolve().parent.parent))

import asyncpg
import uvloop
from harness.callgrind import instructions
from harness.fixtures import Cell, fast_cells, stretch_events
from harness.pgdb import PgDatabase

from gateway.app import create_app
from gateway.collector import tune_collector
from gateway.keys import issue_key
from gateway.settings import Settings, load_file_config

CONCURRENCY = 16
TOML = "[plan]\n[rate_limit]\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\n"
SITE_PATCHES = Path(__file__).resolve().parent / "harness" / "site" / "sitecustomize.py"
STORES = ("sqlite", "shared", "postgres")


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self._i = 0

    async def readany(self) -> bytes:
        if self._i < len(self._chunks):
            self._i += 1
            return self._chunks[self._i - 1]
        return b""

    def at_eof(self) -> bool:
        return self._i >= len(self._chunks)


class _Response:
    status = 200

    def __init__(self, chunks: list[bytes], content_type: bytes) -> None:
        self.content = _Content(chunks)
        self.raw_headers = ((b"Content-Type", content_type), (b"request-id", b"req_bench"))
        self.headers: dict[str, str] = {}

    async def __aenter__(self) -> _Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


class FixtureSession:
    """Stands in for the aiohttp session: every call answers the cell's fixture, as nginx would."""

    def __init__(self, cell: Cell, events: int = 0) -> None:
        fx = cell.fixture
        chunks = fx.events() if fx.stream else [fx.body()]
        self._chunks = stretch_events(chunks, events) if fx.stream and events else chunks
        self._type = b"text/event-stream" if fx.stream else b"application/json"

    async def request(self, *args: Any, **kwargs: Any) -> _Response:
        return _Response(self._chunks, self._type)

    async def close(self) -> None:
        pass


def request_for(cell: Cell, key: str) -> tuple[dict[str, Any], bytes]:
    stream = cell.fixture.stream
    if cell.name.startswith("gemini"):
        op = "streamGenerateContent" if stream else "generateContent"
        path = f"/gemini/v1beta/models/gemini-2.5-flash:{op}"
        query = b"alt=sse" if stream else b""
        headers = [(b"x-goog-api-key", key.encode()), (b"content-type", b"application/json")]
        body = b'{"contents": [{"parts": [{"text": "Hello"}], "role": "user"}]}'
    else:
        path, query = "/anthropic/v1/messages", b""
        headers = [
            (b"x-api-key", key.encode()),
            (b"content-type", b"application/json"),
            (b"anthropic-version", b"2023-06-01"),
        ]
        body = b'{"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]'
        body += b', "stream": true}' if stream else b"}"
    scope = {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": headers}
    return scope, body


async def measure(
    cell: Cell,
    requests: int,
    rounds: int,
    profile: bool,
    check: bool = True,
    events: int = 0,
    store: str = "sqlite",
    pg_url: str = "",
    timers: bool = True,
    linger: float = 0.02,
) -> list[float]:
    work = Path(tempfile.mkdtemp(prefix="polar-pipeline-"))
    config = work / "gateway.toml"
    config.write_text(TOML)
    db = pg_url if store == "postgres" else f"sqlite:///{work / 'bench.db'}"
    settings = Settings(
        database_url=db,
        journal_dir=str(work / "journal"),
        config_path=config,
        file=load_file_config(config),
        anthropic_api_key="sk-bench",
        gemini_api_key="bench",
        shared=store == "shared",
        metrics=os.environ.get("GATEWAY_METRICS", "admin"),  # GATEWAY_METRICS=off: what the metrics cost
        record_linger_seconds=linger,
    )
    if not timers:
        settings = dataclasses.replace(
            settings, keeper_poll_seconds=3600.0, heartbeat_seconds=3600.0, heartbeat_stale_seconds=3 * 3600.0
        )
    app = create_app(settings)
    tune_collector()  # as `gateway serve` does once the app is built
    s = app.services
    lifespan: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    started = asyncio.Event()

    async def lifespan_send(message: dict[str, str]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"].endswith("failed"):
            raise RuntimeError(message)

    await lifespan.put({"type": "lifespan.startup"})
    life = asyncio.create_task(app.app({"type": "lifespan", "asgi": {"version": "3.0"}}, lifespan.get, lifespan_send))
    await started.wait()
    assert s.client is not None
    await s.client.close()
    s.client = FixtureSession(cell, events)  # type: ignore[assignment]
    key = (await issue_key(s.store, "bench-user")).key
    scope, body = request_for(cell, key)
    never = asyncio.Event()

    async def one() -> None:
        delivered = False
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client stays connected
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(dict(scope), receive, send)
        if status != [200]:
            raise RuntimeError(f"{cell.name}: status {status}")

    async def batch(n: int) -> None:
        for _ in range(n // CONCURRENCY):
            await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
        await s.recorder.close()  # the store's share of the work is in the measurement

    await batch(CONCURRENCY * 20)  # warm up
    results: list[float] = []
    prof = cProfile.Profile() if profile else None
    for _ in range(rounds):
        t0 = time.process_time()
        if prof:
            prof.enable()
        await batch(requests)
        if prof:
            prof.disable()
        results.append(1e6 * (time.process_time() - t0) / (requests // CONCURRENCY * CONCURRENCY))
    served = CONCURRENCY * 20 + rounds * (requests // CONCURRENCY * CONCURRENCY)
    await lifespan.put({"type": "lifespan.shutdown"})
    await life
    if check:
        recorded = await pg_meters(pg_url) if store == "postgres" else sqlite_meters(work / "bench.db")
        check_meters(recorded, cell, served)
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(45)
    return results


def sqlite_meters(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(
            conn.execute(
                "SELECT u.key, SUM(u.value) FROM requests, json_each(requests.usage) AS u GROUP BY u.key"
            ).fetchall()
        )


async def pg_meters(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT u.key, SUM(u.value::bigint) FROM requests"
            " CROSS JOIN LATERAL jsonb_each_text(usage) AS u GROUP BY u.key"
        )
    finally:
        await conn.close()
    return {r[0]: int(r[1]) for r in rows}


def check_meters(recorded: dict[str, int], cell: Cell, served: int) -> None:
    expected = {m: v * served for m, v in cell.fixture.usage.items() if v}
    if recorded != expected:
        raise SystemExit(f"{cell.name}: recorded {recorded} != expected {expected} ({served} requests)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="anthropic_json@16,anthropic_sse@16,gemini_json@16,gemini_sse@16")
    ap.add_argument("--requests", type=int, default=12000, help="per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--instructions", action="store_true", help="instructions per request under callgrind")
    ap.add_argument("--tree", type=Path, help="measure the gateway package of this checkout")
    ap.add_argument(
        "--events", type=int, default=0, help="stretch streams to this many events (same usage), as --slow does"
    )
    ap.add_argument(
        "--no-meter-check", action="store_true", help="for a --tree that cuts recording out (to see what it costs)"
    )
    ap.add_argument("--store", choices=STORES, default="sqlite", help="shared: SQLite as one of several processes")
    ap.add_argument("--memory-limiter", action="store_true", help="rate limits in memory, shared or not")
    ap.add_argument("--no-timers", action="store_true", help="keeper poll and heartbeat once an hour")
    ap.add_argument(
        "--linger", type=float, default=0.02, help="the recorder's linger (--instructions: 3600, batches by size)"
    )
    args = ap.parse_args()
    if args.tree is not None and not (args.tree / "gateway" / "__init__.py").exists():
        ap.error(f"--tree: {args.tree} holds no gateway package")
    cells = {c.name: c for c in fast_cells()}
    unknown = [n for n in args.cells.split(",") if n not in cells]
    if unknown:
        ap.error(f"unknown cell(s) {', '.join(unknown)}; cells: {', '.join(cells)}")
    if args.instructions or (args.tree is not None and "PIPELINE_GATEWAY_ROOT" not in os.environ):
        return run_children(args)
    logging.getLogger("gateway").setLevel(logging.ERROR)  # "Polar is not configured" and the like
    check = not args.no_meter_check
    if args.memory_limiter:
        os.environ["BENCH_MEMORY_LIMITER"] = "1"
        runpy.run_path(str(SITE_PATCHES))
    for name in args.cells.split(","):
        pg = PgDatabase("pipeline") if args.store == "postgres" else None
        try:
            us = uvloop.run(
                measure(
                    cells[name],
                    args.requests,
                    args.rounds,
                    args.profile,
                    check,
                    args.events,
                    args.store,
                    pg.url if pg else "",
                    not args.no_timers,
                    args.linger,
                )
            )
        finally:
            if pg:
                pg.drop()
        rounds = ", ".join(f"{u:.1f}" for u in us)
        checked = "meters exact" if check else "meters not checked"
        print(f"{name:<18} min {min(us):6.1f} us CPU/request  (rounds: {rounds}); {checked}", flush=True)
    return 0


def run_children(args: argparse.Namespace) -> int:
    """--tree and --instructions: run the measurement in child processes (under callgrind for the latter)."""
    env = dict(os.environ)
    if args.tree is not None:
        env["PIPELINE_GATEWAY_ROOT"] = str(args.tree.resolve())
    me = [sys.executable, str(Path(__file__).resolve()), "--events", str(args.events), "--store", args.store]
    me += ["--no-meter-check"] if args.no_meter_check else []
    me += ["--memory-limiter"] if args.memory_limiter else []
    me += ["--no-timers"] if args.no_timers else []
    if not args.instructions:
        me += ["--linger", str(args.linger)]
        argv = [*me, "--cells", args.cells, "--requests", str(args.requests), "--rounds", str(args.rounds)]
        return subprocess.run(argv + (["--profile"] if args.profile else []), env=env).returncode
    small, large = 800, 2400
    for name in args.cells.split(","):
        # Batches by size only (2,000) and not by time: a slower run (valgrind on a busy machine)
        # would otherwise make smaller batches and count more per request.
        runs = (
            [*me, "--linger", "3600", "--cells", name, "--requests", str(n), "--rounds", "1"] for n in (small, large)
        )
        counts = [instructions(argv, name, env) for argv in runs]
        per_request = (counts[1] - counts[0]) / ((large - small) // CONCURRENCY * CONCURRENCY)
        where = args.tree or "this checkout"
        print(f"{name:<18} {per_request:10,.0f} instructions/request (gateway of {where})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
