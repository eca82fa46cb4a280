#!/usr/bin/env python3
"""Accuracy benchmark: does every token the upstream served end up billed exactly once?

One command (from the repository root, with the venv's python)::

    python bench/accuracy.py [--users 20] [--requests 400] [--seed 1] [--out bench/accuracy.md]

It runs the fake provider upstream and the fake Polar in this process (tests/fakes), starts
``python -m gateway serve`` (SQLite) against them and drives many concurrent users through the
official SDKs (anthropic.AsyncAnthropic and google-genai's ``.aio``): JSON and streams, both
providers, some streams cut by the client after the first chunk, a few heavy users that run
into their quota. Mid-run it kills the gateway with SIGKILL while streams are in flight and
restarts it on the same port and database; Polar answers 503 for a stretch of the run and then
fails a few more ingests. At the end it waits until every local event reached Polar and prints
one table: what the upstream served per meter vs the local events vs what Polar received
(deduplicated by external id), lost and double-counted events, quota overshoot and the
estimated records. Exit status 1 when anything was lost, double-counted or over quota.

Ground truth is the fake upstream itself (not the clients, not the gateway): every request
carries a tag in its model name, and the upstream notes which fixture it answered each tag with
and whether it wrote that response to its last byte. See bench/README.md ("Accuracy").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests.fakes
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the harness package

from harness.accuracy_accounting import (
    Db,
    PostgresDb,
    SqliteDb,
    account,
    failures_of,
    ledger_snapshot,
    wait_synced,
    wait_until,
)
from harness.accuracy_drive import Clients, GatewayProcess, drive, issue_key, make_plan, write_config
from harness.accuracy_fakes import ADMIN_TOKEN, POLAR_TOKEN, BenchPolar, BenchUpstream
from harness.accuracy_multi import drive_multi, replicas
from harness.accuracy_report import render
from harness.pgdb import PgDatabase
from harness.processes import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"


# ---------------------------------------------------------------------------------------------- main
def all_stored(urls: list[str], keys: dict[str, str]) -> bool:
    """Nothing in flight (no reservation held) and nothing finished but not yet in the store, on every replica."""
    for url in urls:
        if any(m["reserved"] for meters in ledger_snapshot(url, keys).values() for m in meters.values()):
            return False
        if httpx.get(f"{url}/healthz", timeout=5).json()["unstored"] != 0:
            return False
    return True


def kept(pg: PgDatabase | None, keep: bool) -> str:
    if pg is None:
        return "gateway.log, acc.db"
    return f"gateway-N.log; database {pg.name} {'kept' if keep else 'dropped'}"


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    loop = asyncio.get_running_loop()
    unreleased = 0

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal unreleased
        if context.get("message") == "Unclosed connection":
            unreleased += 1  # see the note in the report; counted, not printed
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(on_loop_error)
    tmp = Path(tempfile.mkdtemp(prefix="accuracy-"))
    upstream = BenchUpstream(stream_delay=args.stream_delay, json_delay=args.json_delay)
    polar = BenchPolar(POLAR_TOKEN)
    upstream.start()
    polar.start()
    pg = await asyncio.to_thread(PgDatabase, "accuracy") if args.multi else None
    db: Db = PostgresDb(pg.url) if pg else SqliteDb(tmp / "acc.db")
    write_config(tmp / "gateway.toml")
    env = {
        "GATEWAY_DATABASE_URL": pg.url if pg else f"sqlite:///{tmp / 'acc.db'}",
        "GATEWAY_CONFIG": str(tmp / "gateway.toml"),
        "GATEWAY_ANTHROPIC_UPSTREAM": upstream.url,
        "GATEWAY_GEMINI_UPSTREAM": upstream.url,
        "ANTHROPIC_API_KEY": "sk-ant-accuracy-bench",
        "GEMINI_API_KEY": "AIza-accuracy-bench",
        "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "POLAR_ACCESS_TOKEN": POLAR_TOKEN,
        "POLAR_BASE_URL": polar.url,
        "GATEWAY_SYNC_INTERVAL_SECONDS": "0.5",
        "GATEWAY_SYNC_MAX_ATTEMPTS": "1000",  # nothing parks: Polar being down must only delay delivery
        # The sync loop backs off after an outage (doubling up to 5 min by default): cap it so that the
        # run ends seconds, not minutes, after Polar's last failure.
        "GATEWAY_SYNC_BACKOFF_SECONDS": "0.5",
        "GATEWAY_SYNC_BACKOFF_MAX_SECONDS": "2",
        "GATEWAY_DRAIN_TIMEOUT_SECONDS": "5",
        "GATEWAY_LIMITS_MAX_AGE_SECONDS": str(args.limits_max_age),
    }
    if args.multi:
        # Redis for the rate limits; a dead replica's leases return after 3 s without its heartbeat.
        env.update(GATEWAY_REDIS_URL=REDIS_URL, GATEWAY_HEARTBEAT_SECONDS="1", GATEWAY_HEARTBEAT_STALE_SECONDS="3")
        gws = replicas(env, args.multi, tmp)
    else:
        gws = [GatewayProcess(env, free_port(), tmp / "gateway.log")]
    urls = [gw.url for gw in gws]
    clients: list[Clients] = []
    try:
        await asyncio.gather(*(asyncio.to_thread(gw.start) for gw in gws))
        # --multi: user ids of their own, as Redis is shared with whoever else uses it.
        prefix = f"acc{secrets.token_hex(3)}-" if args.multi else ""
        users = [f"{prefix}user{i:03d}" for i in range(args.users)]
        heavy = users[: max(1, args.users // 5)]
        keys = {u: issue_key(gws[0].url, u) for u in users}
        plan = make_plan(users, heavy, args.requests, rng)
        clients = [Clients.create(url, keys) for url in urls]
        if args.multi:
            tl = await drive_multi(plan, clients, gws, upstream, polar, args.concurrency)
        else:
            tl = await drive(plan, clients[0], gws[0], upstream, polar, args.concurrency)
        await asyncio.to_thread(wait_until, lambda: all_stored(urls, keys), 30, "every request to be stored")
        nudged = await asyncio.to_thread(wait_synced, db, polar, args.sync_timeout)
        ledgers = [await asyncio.to_thread(ledger_snapshot, url, keys) for url in urls]
        await asyncio.gather(*(asyncio.to_thread(gw.stop) for gw in gws))
        acc = await asyncio.to_thread(account, db, upstream, polar, users, ledgers)
    except BaseException:
        print(f"kept {tmp} ({kept(pg, args.keep)})", file=sys.stderr)
        raise
    finally:
        for c in clients:
            await c.close()
        for gw in gws:
            gw.stop()
        upstream.stop()
        polar.stop()
        if pg and not args.keep:  # (a shared server: the database goes, the logs stay on failure)
            await asyncio.to_thread(pg.drop)
    gc.collect()  # let google-genai's abandoned stream generators go now, so their warnings are counted
    await asyncio.sleep(0.1)
    tl.unreleased_connections = unreleased
    failures = failures_of(acc)
    text = "\n".join(render(args, plan, heavy, tl, acc, nudged)) + "\n"
    print(text)
    if args.out:
        await asyncio.to_thread(Path(args.out).write_text, text)
        print(f"written to {args.out}")
    if args.keep or failures:
        print(f"kept {tmp} ({kept(pg, args.keep)})")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default="bench/accuracy.md", help="markdown output ('' to skip)")
    ap.add_argument("--stream-delay", type=float, default=0.15, help="seconds between stream events upstream")
    ap.add_argument("--json-delay", type=float, default=0.05, help="seconds before a JSON reply upstream")
    ap.add_argument(
        "--limits-max-age",
        type=float,
        default=4.0,
        help="GATEWAY_LIMITS_MAX_AGE_SECONDS: small, so limits refresh from Polar during the traffic",
    )
    ap.add_argument("--sync-timeout", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (gateway log, database)")
    ap.add_argument(
        "--multi",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="N",
        help="N replicas (default 3) on one PostgreSQL database + Redis; one is killed and restarted, Polar flaps",
    )
    args = ap.parse_args()
    if args.users < 2 or args.requests < 20:
        ap.error("need at least 2 users and 20 requests")
    if args.multi == 1:
        ap.error("--multi needs at least 2 replicas")
    if args.multi and args.out == "bench/accuracy.md":
        args.out = "bench/accuracy_multi.md"
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
