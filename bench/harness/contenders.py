"""The contenders: direct nginx, the bare pass-throughs (bench/bare.py) and the gateway."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .fixtures import Cell, Fixture
from .pgdb import PgDatabase
from .processes import Proc, free_port, spawn, wait_port
from .settings import BENCH, BOTH_CPUS, CONTENDER_CPU, GATEWAYS, LOAD_CPU, REDIS_URL, ROOT
from .upstream import Nginx

SITE = Path(__file__).resolve().parent / "site"  # measurement patches (see its sitecustomize.py)

# --- contenders ----------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    port: int
    proc: Proc | None
    prefixed: bool  # "/anthropic" and "/gemini" path prefixes (the gateway's URL layout)
    keys: dict[str, str] = field(default_factory=dict)  # cell name -> gateway key
    users: dict[str, str] = field(default_factory=dict)  # cell name -> gateway user id
    nginx: Nginx | None = None
    cpus: str = CONTENDER_CPU  # taskset list of the CPUs it runs on
    env: dict[str, str] = field(default_factory=dict)  # the gateway's environment (for its CLI)
    pg: PgDatabase | None = None  # gateway-pg's database (dropped by `cleanup`)

    def service_pids(self) -> list[int]:
        """Server processes working for this contender outside its own tree: the PostgreSQL backends
        of its database, pinned to the load's CPU (so the contender's core carries only the gateway)."""
        return self.pg.pin_backends(LOAD_CPU) if self.pg else []

    def cleanup(self) -> None:
        if self.pg:
            self.pg.drop()
            self.pg = None

    @property
    def pid(self) -> int:
        if self.nginx:
            return self.nginx.proc.pid
        assert self.proc is not None
        return self.proc.pid

    def prefix(self, fixture: Fixture) -> str:
        return f"/{fixture.provider}" if self.prefixed else ""

    def key(self, cell: Cell) -> str:
        return self.keys.get(cell.name, "sk-bench" if cell.fixture.provider == "anthropic" else "bench")

    def as_user(self, tag: str, cell: Cell) -> Contender:
        """A view of this contender that sends `cell` with the extra key `tag` (the gateway's own user for a
        side measurement, so that the meter check's per-cell users see only their cell's requests)."""
        if tag not in self.keys:
            return self
        return dataclasses.replace(self, keys={cell.name: self.keys[tag]})

    def stop(self) -> None:
        if self.nginx:
            self.nginx.stop()
        if self.proc:
            self.proc.stop()


def uvicorn_flags(port: int) -> list[str]:
    return [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--no-proxy-headers",  # as `gateway serve` runs (see bench/bare.py)
        "--log-level",
        "warning",
    ]


def start_bare(mode: str, upstream: Nginx, workdir: Path, wrap: Sequence[str] = (), workers: int = 1) -> Contender:
    """`wrap`: a command the contender runs under (bench/instructions.py: valgrind). `workers` > 1:
    the gateway's supervisor (a listening socket per worker) on both CPUs, as `gateway-w2` runs."""
    port = free_port()
    env = dict(os.environ, BARE_MODE=mode, BARE_UPSTREAM=upstream.url)
    name, cpus = f"bare-{mode}", CONTENDER_CPU
    if workers > 1:
        argv = [*wrap, sys.executable, str(BENCH / "bare.py"), "--mode", mode, "--upstream", upstream.url]
        argv += ["--port", str(port), "--workers", str(workers)]
        name, cpus = f"bare-{mode}-w{workers}", BOTH_CPUS
    else:
        argv = [*wrap, sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH), "--factory", "bare:create_app"]
        argv += uvicorn_flags(port)
    proc = spawn(name, argv, workdir, cpus, env)
    wait_port(proc, port, timeout=120 if wrap else 30)
    return Contender(name, port, proc, prefixed=True, cpus=cpus)


GATEWAY_TOML = """\
# bench/run.py: unlimited plan, rate limits that are never hit.
[plan]

[rate_limit]
requests_per_minute = 100000000
tokens_per_minute = 100000000000
"""


def gateway_env(
    workdir: Path, port: int, upstream: Nginx, name: str = "gateway", database_url: str = ""
) -> dict[str, str]:
    gwdir = workdir / name
    gwdir.mkdir(exist_ok=True)
    config = gwdir / "gateway.toml"
    config.write_text(GATEWAY_TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "POLAR_"))}
    env.update(
        GATEWAY_DATABASE_URL=database_url or f"sqlite:///{gwdir / 'bench.db'}",
        GATEWAY_CONFIG=str(config),
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(port),
        GATEWAY_ANTHROPIC_UPSTREAM=upstream.url,
        GATEWAY_GEMINI_UPSTREAM=upstream.url,
        ANTHROPIC_API_KEY="sk-bench",
        GEMINI_API_KEY="bench",
        GATEWAY_ADMIN_TOKEN="bench",
    )
    if database_url:  # (PostgreSQL: the journal would go to the working directory, the repository)
        env["GATEWAY_JOURNAL_DIR"] = str(gwdir / "journal")
    return env


def gateway_available() -> str | None:
    """None when `python -m gateway serve` exists, else why not."""
    if not (ROOT / "gateway" / "cli.py").exists():
        return "gateway/cli.py does not exist yet"
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0 or "serve" not in out.stdout:
        return f"`python -m gateway --help` does not offer `serve`: {(out.stdout + out.stderr).strip()[-300:]}"
    return None


def gateway_cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        raise RuntimeError(f"python -m gateway {' '.join(args)} failed ({out.returncode}):\n{out.stderr}{out.stdout}")
    return out.stdout


def last_json(text: str) -> object:
    """The JSON document printed by a CLI (the last line or block that parses)."""
    with contextlib.suppress(ValueError):
        return json.loads(text)
    for line in reversed(text.splitlines()):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    raise ValueError(f"no JSON in output: {text[-300:]!r}")


def start_gateway(
    upstream: Nginx,
    workdir: Path,
    cells: Sequence[Cell],
    extra: Sequence[str] = (),
    wrap: Sequence[str] = (),
    name: str = "gateway",
    memory_limiter: bool = False,
) -> Contender:
    """The gateway with one user (and key) per cell, plus one per `extra` tag (keys[tag], users[tag]).
    `name` is one of GATEWAYS: its store (SQLite, or a fresh PostgreSQL database), its workers and
    whether its rate limits live in Redis. `memory_limiter`: rate limits in each process's memory
    even when shared (see `site/sitecustomize.py`)."""
    postgres, workers, redis = GATEWAYS[name]
    port = free_port()
    pg = PgDatabase() if postgres else None
    try:
        env = gateway_env(workdir, port, upstream, name, pg.url if pg else "")
        if redis:
            env["GATEWAY_REDIS_URL"] = REDIS_URL
        patches = {"BENCH_MEMORY_LIMITER": memory_limiter, "BENCH_SLOW_WORKERS": "valgrind" in wrap and workers > 1}
        if any(patches.values()):
            env.update({k: "1" for k, on in patches.items() if on})
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
        contender = _start_gateway(env, port, workdir, cells, extra, wrap, name, workers)
    except BaseException:
        if pg:
            pg.drop()
        raise
    contender.pg = pg
    return contender


def _start_gateway(
    env: dict[str, str],
    port: int,
    workdir: Path,
    cells: Sequence[Cell],
    extra: Sequence[str],
    wrap: Sequence[str],
    name: str,
    workers: int,
) -> Contender:
    gateway_cli(env, "migrate")
    keys: dict[str, str] = {}
    users: dict[str, str] = {}
    # Redis is shared with other users of this machine: user ids of our own there.
    user = f"bench-{secrets.token_hex(3)}-" if "GATEWAY_REDIS_URL" in env else "bench-"
    names = [(cell.name, f"{user}user-{i}") for i, cell in enumerate(cells)] + [(t, f"{user}{t}") for t in extra]
    for tag, user in names:
        created = last_json(gateway_cli(env, "keys", "create", "--user", user, "--json"))
        assert isinstance(created, dict), created
        keys[tag] = str(created["key"])
        users[tag] = str(created.get("user_id", user))
    argv = [*wrap, sys.executable, "-m", "gateway", "serve"] + (["--workers", str(workers)] if workers > 1 else [])
    cpus = CONTENDER_CPU if workers == 1 else BOTH_CPUS
    proc = spawn(name, argv, workdir, cpus, env)
    try:
        wait_port(proc, port, timeout=600 if wrap else 60)  # (valgrind on a machine shared with others: slow)
    except BaseException:
        proc.stop()
        raise
    return Contender(name, port, proc, prefixed=True, keys=keys, users=users, cpus=cpus, env=env)


def start_direct(workdir: Path, slow: bool) -> Contender:
    nginx = Nginx("direct", workdir, slow, CONTENDER_CPU, access_log=False)
    return Contender("direct", nginx.port, None, prefixed=False, nginx=nginx)
