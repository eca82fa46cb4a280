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
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tests.fakes
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the harness package

from harness.accuracy_accounting import account, failures_of, ledger_snapshot, wait_synced, wait_until
from harness.accuracy_drive import Clients, GatewayProcess, drive, issue_key, make_plan, write_config
from harness.accuracy_fakes import ADMIN_TOKEN, POLAR_TOKEN, BenchPolar, BenchUpstream
from harness.accuracy_report import render
from harness.processes import free_port


# ---------------------------------------------------------------------------------------------- main
def all_stored(url: str, keys: dict[str, str]) -> bool:
    """Nothing in flight (no reservation held) and nothing finished but not yet in the store."""
    held = any(m["reserved"] for meters in ledger_snapshot(url, keys).values() for m in meters.values())
    return not held and httpx.get(f"{url}/healthz", timeout=5).json()["unstored"] == 0


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
    db = tmp / "acc.db"
    write_config(tmp / "gateway.toml")
    env = {
        "GATEWAY_DATABASE_URL": f"sqlite:///{db}",
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
        "GATEWAY_DRAIN_TIMEOUT_SECONDS": "5",
        "GATEWAY_LIMITS_MAX_AGE_SECONDS": str(args.limits_max_age),
    }
    gw = GatewayProcess(env, free_port(), tmp / "gateway.log")
    clients: Clients | None = None
    try:
        await asyncio.to_thread(gw.start)
        users = [f"user{i:03d}" for i in range(args.users)]
        heavy = users[: max(1, args.users // 5)]
        keys = {u: issue_key(gw.url, u) for u in users}
        plan = make_plan(users, heavy, args.requests, rng)
        clients = Clients.create(gw.url, keys)
        tl = await drive(plan, clients, gw, upstream, polar, args.concurrency)
        await asyncio.to_thread(wait_until, lambda: all_stored(gw.url, keys), 30, "every request to be stored")
        nudged = await asyncio.to_thread(wait_synced, db, polar, args.sync_timeout)
        ledger = await asyncio.to_thread(ledger_snapshot, gw.url, keys)
        await asyncio.to_thread(gw.stop)
        acc = account(db, upstream, polar, users, ledger)
    except BaseException:
        print(f"kept {tmp} (gateway.log, acc.db)", file=sys.stderr)
        raise
    finally:
        if clients is not None:
            await clients.close()
        gw.stop()
        upstream.stop()
        polar.stop()
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
        print(f"kept {tmp} (gateway.log, acc.db)")
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
    args = ap.parse_args()
    if args.users < 2 or args.requests < 20:
        ap.error("need at least 2 users and 20 requests")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
