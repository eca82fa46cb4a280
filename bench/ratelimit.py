"""The shared rate limiters' cost per request, in-process: acquire + settle, two limiters on one store.

    python bench/ratelimit.py [--backends sqlite,postgres,redis] [--requests 20000] [--rounds 3] [--rate 2000]
    python bench/ratelimit.py --instructions [--tree ../other-checkout]

Each backend gets two limiters ("processes": each with its own connections) on one store: a SQLite
file, a throw-away PostgreSQL database, or Redis under a key prefix of its own (`memory`: the
in-memory limiter of one process, the floor). 16 tasks per limiter
loop `acquire(user, estimate)` then `settle(user, ticket, actual)` for one user, with limits so high
they are never hit (as in bench/run.py), the way the gateway's hot path calls them. The limiters
run on a virtual clock (their test hook, passed to the backend too) that advances 1/`--rate` s per
request: what a limiter does per second (a lease a second) costs the same per request however
slowly the bench runs, as under callgrind. It prints the CPU time per request (this process's: the
SQLite thread is counted, the PostgreSQL and Redis servers are not) and the wall time.
`--instructions` runs it under callgrind at two sizes and prints the difference per request
(start-up cancels out); `--tree PATH` measures another checkout's gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, os.environ.get("RL_BENCH_GATEWAY_ROOT") or str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from harness.callgrind import instructions
from harness.pgdb import PgDatabase
from harness.settings import REDIS_URL

from tests.support_ratelimit import drop_redis_keys

CONCURRENCY = 16  # tasks per limiter
LIMITERS = 2
RPM, TPM = 100_000_000, 100_000_000_000  # bench/run.py's: never hit
ESTIMATE, ACTUAL = 1033, 42  # tokens: max_tokens + input estimate at admission, the usage at the end


class VirtualClock:
    def __init__(self, rate: float) -> None:
        self.now = time.time()
        self.step = 1.0 / rate

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def limiters(backend: str, url: str, clock: VirtualClock) -> AsyncIterator[list[Any]]:
    from gateway.ratelimit.limiter import RateLimiter
    from gateway.ratelimit.redis_backend import RedisRateLimiter
    from gateway.ratelimit.shared import StoreRateLimiter
    from gateway.store import create_store

    if backend == "memory":  # the floor: one process's limiter, nothing shared
        yield [RateLimiter(RPM, TPM, clock) for _ in range(LIMITERS)]
        return
    if backend == "redis":
        prefix = f"bench:rl:{secrets.token_hex(4)}:"
        made = [RedisRateLimiter(REDIS_URL, RPM, TPM, key_prefix=prefix, clock=clock) for _ in range(LIMITERS)]
        try:
            yield made
        finally:
            for rl in made:
                await rl.close()
            await drop_redis_keys(REDIS_URL, prefix)
        return
    stores = []
    try:
        for _ in range(LIMITERS):
            store = create_store(url)
            await store.open()
            await store.migrate()
            stores.append(store)
        made = [StoreRateLimiter(store, RPM, TPM, clock=clock) for store in stores]
        try:
            yield made
        finally:
            for rl in made:
                await rl.close()
    finally:
        for store in stores:
            await store.close()


async def drive(rls: list[Any], clock: VirtualClock, requests: int) -> None:
    per_task = requests // (len(rls) * CONCURRENCY)

    async def one(rl: Any) -> None:
        for _ in range(per_task):
            clock.now += clock.step
            refusal, ticket = await rl.acquire("bench-user", ESTIMATE)
            assert refusal is None, refusal
            await asyncio.sleep(0)  # the upstream call, at its cheapest
            rl.settle("bench-user", ticket, ACTUAL)

    await asyncio.gather(*(one(rl) for rl in rls for _ in range(CONCURRENCY)))
    for rl in rls:
        if hasattr(rl, "flush"):  # (the in-memory limiter has nothing to send)
            await rl.flush()


async def measure(backend: str, url: str, requests: int, rounds: int, rate: float) -> list[tuple[float, float]]:
    results = []
    clock = VirtualClock(rate)
    async with limiters(backend, url, clock) as rls:
        await drive(rls, clock, min(requests, 2000))  # warm-up: connections, statements, scripts
        for _ in range(rounds):
            cpu, wall = time.process_time(), time.perf_counter()
            await drive(rls, clock, requests)
            done = requests // (LIMITERS * CONCURRENCY) * LIMITERS * CONCURRENCY
            results.append(((time.process_time() - cpu) / done * 1e6, done / (time.perf_counter() - wall)))
    return results


def run_children(args: argparse.Namespace) -> int:
    """--tree and --instructions: the measurement in child processes (under callgrind for the latter)."""
    env = dict(os.environ)
    if args.tree is not None:
        env["RL_BENCH_GATEWAY_ROOT"] = str(args.tree.resolve())
    me = [sys.executable, str(Path(__file__).resolve())]
    if not args.instructions:
        argv = [*me, "--backends", args.backends, "--requests", str(args.requests), "--rounds", str(args.rounds)]
        argv += ["--rate", str(args.rate)]
        return subprocess.run(argv, env=env).returncode
    small, large = 2048, 8192
    for backend in args.backends.split(","):
        runs = (
            [*me, "--backends", backend, "--requests", str(n), "--rounds", "1", "--rate", str(args.rate)]
            for n in (small, large)
        )
        counts = [instructions(argv, backend, env) for argv in runs]
        per_request = (counts[1] - counts[0]) / (large - small)
        where = args.tree or "this checkout"
        print(f"{backend:<9} {per_request:10,.0f} instructions/request (gateway of {where})", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--backends", default="sqlite,postgres,redis")
    ap.add_argument("--requests", type=int, default=20000, help="per round, over both limiters")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000.0, help="requests per (virtual) second, over both limiters")
    ap.add_argument("--instructions", action="store_true", help="instructions per request under callgrind")
    ap.add_argument("--tree", type=Path, help="measure the gateway package of this checkout")
    args = ap.parse_args()
    unknown = set(args.backends.split(",")) - {"memory", "sqlite", "postgres", "redis"}
    if unknown:
        ap.error(f"unknown backend(s) {', '.join(sorted(unknown))}")
    if args.instructions or (args.tree is not None and "RL_BENCH_GATEWAY_ROOT" not in os.environ):
        return run_children(args)
    logging.getLogger("gateway").setLevel(logging.ERROR)
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
            pg = PgDatabase("bench_rl") if backend == "postgres" else None
            try:
                url = pg.url if pg else f"sqlite:///{tmp}/shared.db"
                results = uvloop.run(measure(backend, url, args.requests, args.rounds, args.rate))
            finally:
                if pg:
                    pg.drop()
        cpu = ", ".join(f"{c:.1f}" for c, _ in results)
        best = max(r for _, r in results)
        print(
            f"{backend:<9} min {min(c for c, _ in results):7.1f} us CPU/request (rounds: {cpu}); "
            f"best {best:,.0f} requests/s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
