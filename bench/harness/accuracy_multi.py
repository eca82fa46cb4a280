"""Accuracy bench, multi-process mode: several `gateway serve` replicas on one PostgreSQL database and
Redis, the requests spread over them, one replica killed (SIGKILL) and restarted, Polar flapping."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .accuracy_drive import Clients, GatewayProcess, Planned, Timeline, send_one
from .accuracy_fakes import BenchPolar, BenchUpstream
from .processes import free_port

# Polar goes down and comes back three times (fractions of the plan), then fails a few more ingests.
FLAPS = ((0.15, "down"), (0.30, "up"), (0.45, "down"), (0.60, "up"), (0.70, "down"), (0.80, "up"))
KILL_AT = 0.5


def replicas(env: dict[str, str], n: int, tmp: Path) -> list[GatewayProcess]:
    """`n` replicas, each with a port and a journal of its own (its own disk), one database for all."""
    out = []
    for i in range(n):
        journal = tmp / f"journal-{i}"
        out.append(GatewayProcess({**env, "GATEWAY_JOURNAL_DIR": str(journal)}, free_port(), tmp / f"gateway-{i}.log"))
    return out


async def drive_multi(
    plan: list[Planned],
    clients: list[Clients],
    gws: list[GatewayProcess],
    upstream: BenchUpstream,
    polar: BenchPolar,
    concurrency: int,
) -> Timeline:
    """Round-robin over the replicas (as a load balancer would); at KILL_AT the first replica is
    killed with streams of its own in flight, and until it is healthy again its share goes to the
    others; Polar flaps as FLAPS says."""
    n = len(plan)
    tl = Timeline(kill_at=int(n * KILL_AT), replicas=len(gws), killed_replica=0)
    flaps = {int(n * frac): what for frac, what in FLAPS}
    tl.polar_down_at, tl.polar_up_at = int(n * FLAPS[0][0]), int(n * FLAPS[-1][0])
    sem = asyncio.Semaphore(concurrency)
    tasks: list[asyncio.Task[None]] = []
    streams = [0] * len(gws)  # streams in flight per replica, as the clients see them
    live = [True] * len(gws)
    phase = "before_kill"
    restart: asyncio.Task[None] | None = None

    async def run(p: Planned) -> None:
        if p.stream:
            streams[p.replica] += 1
        try:
            p.result = await send_one(p, clients[p.replica])
        finally:
            if p.stream:
                streams[p.replica] -= 1
            sem.release()

    async def restart_killed(k: int) -> None:
        t1 = time.monotonic()
        await asyncio.to_thread(gws[k].start)
        tl.restart_seconds = time.monotonic() - t1
        live[k] = True

    t0 = time.monotonic()
    for i, p in enumerate(plan):
        if i in flaps:
            polar.down(flaps[i] == "down")
            tl.flaps.append((i, flaps[i]))
            if flaps[i] == "up" and i == tl.polar_up_at:
                polar.fail_next(3, 500, path="/v1/events/ingest")
                polar.fail_next(2, 429, retry_after=1, path="/v1/events/ingest")
        if i == tl.kill_at:
            k = tl.killed_replica
            deadline = time.monotonic() + 5
            while streams[k] < 2 and time.monotonic() < deadline:  # noqa: ASYNC110 (set by other tasks)
                await asyncio.sleep(0.005)
            tl.streams_in_flight_at_kill = streams[k]
            live[k] = False
            gws[k].kill()
            phase = "after_restart"
            restart = asyncio.create_task(restart_killed(k))
        await sem.acquire()
        p.phase = phase
        p.replica = i % len(gws)
        while not live[p.replica]:
            p.replica = (p.replica + 1) % len(gws)
        tasks.append(asyncio.create_task(run(p)))
    await asyncio.gather(*tasks)
    if restart is not None:
        await restart
    tl.drive_seconds = time.monotonic() - t0
    return tl
