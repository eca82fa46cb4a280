"""Accuracy bench: the gateway process, the workload plan and driving it through the official SDKs."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anthropic
import httpx
import httpx2  # (what anthropic 2.x is built on)
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from .accuracy_fakes import (
    ADMIN_TOKEN,
    CLAUDE_MAX_TOKENS,
    GEMINI_MAX_OUTPUT,
    MESSAGES,
    PLAN,
    ROOT,
    BenchPolar,
    BenchUpstream,
)


# ---------------------------------------------------------------------------------------------- gateway
class GatewayProcess:
    """`python -m gateway serve` as a real process (kill -9 needs one); its log goes to a file, not a pipe
    nobody reads (a full pipe would stall the gateway)."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **env, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port)}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start #{self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not healthy within {timeout} s; see {self.log_path}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_config(path: Path) -> None:
    plan = "\n".join(f"{k} = {v}" for k, v in PLAN.items())
    path.write_text(
        f"[plan]\n{plan}\n\n"
        "[rate_limit]  # effectively off: this bench is about billing, not throttling\n"
        "requests_per_minute = 1_000_000\ntokens_per_minute = 1_000_000_000\n\n"
        "[reservation]\ndefault_max_output_tokens = 4096\nimages_per_request = 4\n"
    )


def issue_key(url: str, user: str) -> str:
    resp = httpx.post(
        f"{url}/admin/keys", json={"user_id": user}, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    )
    resp.raise_for_status()
    return str(resp.json()["key"])


# ---------------------------------------------------------------------------------------------- workload
@dataclass
class Planned:
    tag: str
    user: str
    provider: str  # anthropic | gemini
    stream: bool
    cut: bool  # the client leaves after the first chunk
    phase: str = ""  # before_kill | after_restart
    replica: int = 0  # which gateway process it was sent to (--multi)
    result: str = ""  # ok | cut | 402 | 429 | connection | other: ...


def make_plan(users: list[str], heavy: list[str], n: int, rng: random.Random) -> list[Planned]:
    """Half the traffic from the heavy users (they exhaust their quota), half spread over everyone else."""
    light = [u for u in users if u not in heavy] or users
    plan = []
    for i in range(n):
        user = rng.choice(heavy) if rng.random() < 0.5 else rng.choice(light)
        stream = rng.random() < 0.5
        plan.append(
            Planned(
                tag=f"acc{i:06d}",
                user=user,
                provider=rng.choice(["anthropic", "gemini"]),
                stream=stream,
                cut=stream and rng.random() < 0.3,
            )
        )
    return plan


def gemini_client(url: str, key: str) -> genai.Client:
    # attempts=1: google-genai otherwise resends a request once, 1-10 s later, after a connection error
    # (its "implicit retry" on aiohttp), like max_retries=0 for anthropic.
    opts = genai_types.HttpOptions(
        base_url=f"{url}/gemini", timeout=60_000, retry_options=genai_types.HttpRetryOptions(attempts=1)
    )
    return genai.Client(api_key=key, http_options=opts)


@dataclass
class Clients:
    url: str
    keys: dict[str, str]
    claude: dict[str, anthropic.AsyncAnthropic]
    gemini: dict[str, genai.Client]

    @classmethod
    def create(cls, url: str, keys: dict[str, str]) -> Clients:
        return cls(
            url=url,
            keys=keys,
            claude={
                u: anthropic.AsyncAnthropic(base_url=f"{url}/anthropic", api_key=k, max_retries=0, timeout=60)
                for u, k in keys.items()
            },
            gemini={u: gemini_client(url, k) for u, k in keys.items()},
        )

    async def close(self) -> None:
        for c in self.claude.values():
            await c.close()
        for g in self.gemini.values():
            await g.aio.aclose()


async def send_one(p: Planned, clients: Clients) -> str:
    """One request through the real SDK; returns how it ended, as the client saw it."""
    try:
        if p.provider == "anthropic":
            claude = clients.claude[p.user]
            model = f"claude-sonnet-4-6-{p.tag}"
            if not p.stream:
                await claude.messages.create(model=model, max_tokens=CLAUDE_MAX_TOKENS, messages=MESSAGES)
                return "ok"
            stream = await claude.messages.create(
                model=model, max_tokens=CLAUDE_MAX_TOKENS, messages=MESSAGES, stream=True
            )
            async with stream:  # leaving it closes the response, and so the connection
                async for _ in stream:
                    if p.cut:
                        return "cut"
            return "ok"
        model = f"gemini-2.5-flash-{p.tag}"
        config = genai_types.GenerateContentConfig(max_output_tokens=GEMINI_MAX_OUTPUT)
        if not p.stream:
            await clients.gemini[p.user].aio.models.generate_content(model=model, contents="Hello", config=config)
            return "ok"
        if not p.cut:
            chunks = await clients.gemini[p.user].aio.models.generate_content_stream(
                model=model, contents="Hello", config=config
            )
            async for _ in chunks:
                pass
            return "ok"
        # Closing google-genai's stream generator leaves the response open until garbage collection (its
        # inner generators are not closed), so the connection would stay up: a client that leaves for
        # real closes its session. A session of its own, so the user's other requests carry on.
        own = gemini_client(clients.url, clients.keys[p.user])
        try:
            chunks = await own.aio.models.generate_content_stream(model=model, contents="Hello", config=config)
            async for _ in chunks:
                break
            return "cut"
        finally:
            await own.aio.aclose()
    except anthropic.APIStatusError as exc:
        return str(exc.status_code)
    except genai_errors.APIError as exc:
        return str(exc.code)
    except (anthropic.APIConnectionError, httpx2.TransportError, httpx.TransportError, aiohttp.ClientError, OSError):
        return "connection"
    except Exception as exc:
        return f"other: {type(exc).__name__}: {str(exc)[:80]}"


@dataclass
class Timeline:
    polar_down_at: int = 0
    kill_at: int = 0
    polar_up_at: int = 0
    streams_in_flight_at_kill: int = 0
    restart_seconds: float = 0.0
    drive_seconds: float = 0.0
    unreleased_connections: int = 0  # aiohttp's 'Unclosed connection' warnings, counted
    replicas: int = 1  # --multi: gateway processes on one PostgreSQL database
    killed_replica: int = 0
    flaps: list[tuple[int, str]] = field(default_factory=list)  # (request index, "down" | "up") of Polar


async def drive(
    plan: list[Planned],
    clients: Clients,
    gw: GatewayProcess,
    upstream: BenchUpstream,
    polar: BenchPolar,
    concurrency: int,
) -> Timeline:
    """Launch the plan with bounded concurrency; Polar goes down at 30 %, the gateway is killed at 50 %
    (with streams in flight) and restarted, Polar comes back at 75 % and then fails a few more ingests."""
    n = len(plan)
    tl = Timeline(polar_down_at=int(n * 0.30), kill_at=int(n * 0.50), polar_up_at=int(n * 0.75))
    sem = asyncio.Semaphore(concurrency)
    tasks: list[asyncio.Task[None]] = []
    phase = "before_kill"

    async def run(p: Planned) -> None:
        try:
            p.result = await send_one(p, clients)
        finally:
            sem.release()

    t0 = time.monotonic()
    for i, p in enumerate(plan):
        if i == tl.polar_down_at:
            polar.down(True)
        if i == tl.kill_at:
            deadline = time.monotonic() + 5
            while upstream.streams_in_flight < 3 and time.monotonic() < deadline:  # noqa: ASYNC110 (other thread)
                await asyncio.sleep(0.005)
            tl.streams_in_flight_at_kill = upstream.streams_in_flight
            gw.kill()
            phase = "after_restart"
            t1 = time.monotonic()
            await asyncio.to_thread(gw.start)
            tl.restart_seconds = time.monotonic() - t1
        if i == tl.polar_up_at:
            polar.down(False)
            polar.fail_next(3, 500, path="/v1/events/ingest")
            polar.fail_next(2, 429, retry_after=1, path="/v1/events/ingest")
        await sem.acquire()
        p.phase = phase
        tasks.append(asyncio.create_task(run(p)))
    await asyncio.gather(*tasks)
    tl.drive_seconds = time.monotonic() - t0
    return tl
