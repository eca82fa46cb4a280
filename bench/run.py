#!/usr/bin/env python3
"""Gateway benchmark: the gateway against a direct upstream and two bare pass-throughs.

One command (from the repository root, with the venv's python)::

    python bench/run.py [--quick] [--duration 10] [--out bench/results.md]
    python bench/run.py --slow          # slow-upstream mode, 256 connections

It starts a fake provider upstream (nginx + the echo module, serving the recorded fixtures,
streams written one event per write), then, one contender after another, starts the
contender pinned to CPU 0 and drives it with wrk pinned to CPU 1 (the upstream shares CPU 1).
Contenders: ``direct`` (a second nginx, the upstream itself, pinned to CPU 0), ``bare-starlette``
and ``bare-raw`` (bench/bare.py) and ``gateway`` (``python -m gateway serve`` with real keys,
limits that are never hit, metering into SQLite). After the run it checks that the gateway's
recorded meter totals equal the requests the upstream served times the fixture's usage.

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
FIXTURES = ROOT / "tests" / "fixtures"
NGINX_MODULES = Path("/usr/lib/nginx/modules")
ECHO_MODULE = NGINX_MODULES / "ngx_http_echo_module.so"  # fast mode: echo + echo_flush per event
NDK_MODULE = NGINX_MODULES / "ndk_http_module.so"  # slow mode: Lua timing (needs ndk first)
LUA_MODULE = NGINX_MODULES / "ngx_http_lua_module.so"
APT_PACKAGES = ("nginx", "libnginx-mod-http-echo", "libnginx-mod-http-lua", "wrk")

CONTENDER_CPU = "0"
LOAD_CPU = "1"

CONTENDERS = ("direct", "bare-starlette", "bare-raw", "gateway")
BARE = ("bare-starlette", "bare-raw")

# Slow-upstream mode: JSON after 250 ms; streams of 31 events 20 ms apart.
SLOW_JSON_DELAY = 0.25
SLOW_EVENTS = 31
SLOW_EVENT_GAP = 0.02
SLOW_CONNECTIONS = 256

# Targets from the performance issue.
TARGET_RATIO = 0.7
TARGET_P99_MS = 30.0
TARGET_RSS_MB = 120.0
TARGET_SLOW = 0.95

# A cell is flagged when other processes (or the hypervisor) took more than this share of a CPU.
FOREIGN_LIMIT = 0.05


# --- fixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    name: str  # also the wrk script and the upstream's internal location
    provider: str  # "anthropic" | "gemini"
    path: str  # fixture file under tests/fixtures
    stream: bool
    content_type: str
    headers: tuple[tuple[str, str], ...]
    usage: dict[str, int]  # meter -> tokens per request (the fixture's final usage)

    def body(self) -> bytes:
        return (FIXTURES / self.path).read_bytes()

    def events(self, slow: bool = False) -> list[bytes]:
        """The SSE transcript split into events (each with its blank-line terminator)."""
        events = split_events(self.body())
        if slow:
            events = stretch_events(events, SLOW_EVENTS)
        return events

    def served(self, slow: bool = False) -> bytes:
        """The exact body the upstream serves and the client must receive."""
        return b"".join(self.events(slow)) if self.stream else self.body()


ANTHROPIC_HEADERS = (("request-id", "req_011CbenchAaaaaaaaaaaaaaa"), ("anthropic-organization-id", "bench-org"))
GEMINI_HEADERS = (("server-timing", "gfet4t7; dur=412"), ("x-content-type-options", "nosniff"))

FIXTURE_LIST = (
    Fixture(
        "anthropic_json",
        "anthropic",
        "anthropic/message.json",
        False,
        "application/json",
        ANTHROPIC_HEADERS,
        {"claude_input_tokens": 12, "claude_output_tokens": 9},
    ),
    Fixture(
        "anthropic_sse",
        "anthropic",
        "anthropic/stream_text.sse",
        True,
        "text/event-stream; charset=utf-8",
        ANTHROPIC_HEADERS,
        {"claude_input_tokens": 25, "claude_output_tokens": 15},
    ),
    Fixture(
        "gemini_json",
        "gemini",
        "gemini/generate_content.json",
        False,
        "application/json; charset=UTF-8",
        GEMINI_HEADERS,
        {"gemini_input_tokens": 8, "gemini_output_tokens": 9 + 285},
    ),
    Fixture(
        "gemini_sse",
        "gemini",
        "gemini/stream_generate_content.sse",
        True,
        "text/event-stream",
        GEMINI_HEADERS,
        {"gemini_input_tokens": 8, "gemini_output_tokens": 10 + 286},
    ),
)
FIXTURES_BY_NAME = {f.name: f for f in FIXTURE_LIST}


def split_events(body: bytes) -> list[bytes]:
    sep = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
    parts = body.split(sep)
    events = [p + sep for p in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    assert b"".join(events) == body
    return events


def stretch_events(events: list[bytes], total: int) -> list[bytes]:
    """Repeat the content events so the stream has `total` events and the same final usage.

    Anthropic: keep message_start..ping and content_block_stop..message_stop, repeat the deltas.
    Gemini: keep the first and last chunk (the last carries the final usage), repeat the middle.
    """
    deltas = [i for i, e in enumerate(events) if b"content_block_delta" in e]
    first, last = (deltas[0], deltas[-1]) if deltas else (1, len(events) - 2)
    pre, mid, post = events[:first], events[first : last + 1], events[last + 1 :]
    fill = total - len(pre) - len(post)
    return pre + [mid[i % len(mid)] for i in range(fill)] + post


# --- cells ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    fixture: Fixture
    connections: int

    @property
    def name(self) -> str:
        return f"{self.fixture.name}@{self.connections}"

    @property
    def label(self) -> str:
        provider = "Anthropic" if self.fixture.provider == "anthropic" else "Gemini"
        return f"{provider} {'SSE' if self.fixture.stream else 'JSON'}"


def fast_cells() -> list[Cell]:
    f = FIXTURES_BY_NAME
    return [
        Cell(f["anthropic_json"], 1),
        Cell(f["anthropic_json"], 16),
        Cell(f["anthropic_json"], 64),
        Cell(f["anthropic_sse"], 16),
        Cell(f["gemini_json"], 16),
        Cell(f["gemini_sse"], 16),
    ]


def slow_cells() -> list[Cell]:
    return [Cell(f, SLOW_CONNECTIONS) for f in FIXTURE_LIST]


def ideal_latency(fixture: Fixture) -> float:
    return (SLOW_EVENTS - 1) * SLOW_EVENT_GAP if fixture.stream else SLOW_JSON_DELAY


# --- the fake upstream (nginx) -------------------------------------------------------------


def ngx_str(data: bytes) -> str:
    """A single-quoted nginx string whose value is exactly `data` ($ goes through a variable)."""
    text = data.decode("utf-8")
    for raw, esc in (("\\", "\\\\"), ("'", "\\'"), ("\r", "\\r"), ("\n", "\\n"), ("\t", "\\t")):
        text = text.replace(raw, esc)
    return "'" + text.replace("$", "${bench_dollar}") + "'"


def lua_str(data: bytes) -> str:
    """A Lua string literal whose value is exactly `data`."""
    out = []
    for byte in data:
        if 32 <= byte < 127 and byte not in (34, 92):  # printable, not `"` or `\`
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def render_lua_data() -> str:
    """bench_data.lua for slow mode: the bodies and the stretched event lists."""
    lines = ["-- generated by bench/run.py", "return {"]
    for fx in FIXTURE_LIST:
        if fx.stream:
            lines.append(f"  {fx.name} = {{")
            lines += [f"    {lua_str(event)}," for event in fx.events(slow=True)]
            lines.append("  },")
        else:
            lines.append(f"  {fx.name} = {lua_str(fx.body())},")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_locations(slow: bool) -> str:
    out: list[str] = []
    for fx in FIXTURE_LIST:
        lines = [f"location = /_bench/{fx.name} {{", "    internal;", f'    default_type "{fx.content_type}";']
        lines += [f'    add_header {name} "{value}" always;' for name, value in fx.headers]
        if slow and fx.stream:
            lines.append(f"    content_by_lua_block {{ bench.stream(bench_data.{fx.name}, {SLOW_EVENT_GAP}) }}")
        elif slow:
            lines.append(f"    content_by_lua_block {{ bench.json(bench_data.{fx.name}, {SLOW_JSON_DELAY}) }}")
        elif fx.stream:
            for event in fx.events():
                lines += [f"    echo -n {ngx_str(event)};", "    echo_flush;"]
        else:
            lines.append(f"    return 200 {ngx_str(fx.body())};")
        lines.append("}")
        out.append("\n".join(" " * 8 + line for line in lines))
    return "\n".join(out)


def render_nginx_conf(prefix: Path, port: int, slow: bool, access_log: Path | None) -> str:
    template = (BENCH / "nginx" / "upstream.conf.in").read_text()
    log = f"access_log {access_log} bench;" if access_log else "access_log off;"
    modules = [NDK_MODULE, LUA_MODULE] if slow else [ECHO_MODULE]
    http_extra = ""
    if slow:
        (prefix / "bench_data.lua").write_text(render_lua_data())
        http_extra = (
            f'    lua_package_path "{prefix}/?.lua;{BENCH / "nginx"}/?.lua;;";\n'
            '    init_by_lua_block { bench = require("slow"); bench_data = require("bench_data") }'
        )
    values = {
        "MODULES": "\n".join(f"load_module {m};" for m in modules),
        "HTTP_EXTRA": http_extra,
        "PREFIX": str(prefix),
        "PORT": str(port),
        "ACCESS_LOG": log,
        "LOCATIONS": render_locations(slow),
    }
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", value)
    assert "@@" not in template, "unfilled placeholder in upstream.conf.in"
    return template


# --- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def spawn(name: str, argv: Sequence[str], logdir: Path, cpu: str | None, env: dict[str, str] | None = None) -> Proc:
    log = logdir / f"{name}.log"
    cmd = (["taskset", "-c", cpu] if cpu is not None else []) + list(argv)
    with log.open("ab") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    return Proc(name, popen, log)


def wait_port(proc: Proc, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {port} within {timeout:.0f}s:\n{proc.tail()}")


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
    return pids


def peak_rss_mb(pid: int) -> float:
    """Sum of VmHWM (peak resident set) over the process and its children, in MB."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[str, tuple[float, float]]:
    """CPU number -> (user+nice+system seconds, steal seconds) from /proc/stat."""
    out: dict[str, tuple[float, float]] = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                f = line.split()
                user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in f[1:9])
                out[f[0][3:]] = ((user + nice + system) / CLK_TCK, steal / CLK_TCK)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live children."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


@dataclass
class CpuWindow:
    """CPU used during a cell by processes that are not ours (other work on the machine) and steal."""

    contender_pid: int
    load_pids: list[int]
    start: dict[str, tuple[float, float]] = field(default_factory=dict)
    ours: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def __enter__(self) -> CpuWindow:
        self.start = cpu_times()
        self.ours = {CONTENDER_CPU: tree_cpu_seconds(self.contender_pid)}
        self.ours[LOAD_CPU] = sum(tree_cpu_seconds(p) for p in self.load_pids) + children_cpu_seconds()
        self.wall = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        end = cpu_times()
        self.wall = time.monotonic() - self.wall
        used = {CONTENDER_CPU: tree_cpu_seconds(self.contender_pid)}
        used[LOAD_CPU] = sum(tree_cpu_seconds(p) for p in self.load_pids) + children_cpu_seconds()
        self.foreign = {
            cpu: max(0.0, (end[cpu][0] - self.start[cpu][0]) - (used[cpu] - self.ours[cpu])) / self.wall
            for cpu in (CONTENDER_CPU, LOAD_CPU)
        }
        self.steal = {cpu: (end[cpu][1] - self.start[cpu][1]) / self.wall for cpu in (CONTENDER_CPU, LOAD_CPU)}
        self.busy = {cpu: (end[cpu][0] - self.start[cpu][0]) / self.wall for cpu in (CONTENDER_CPU, LOAD_CPU)}


def wait_quiet(timeout: float) -> None:
    """Wait (at most `timeout` s) until other processes use less than 10% of a CPU in total."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        before = cpu_times()
        time.sleep(0.5)
        after = cpu_times()
        busy = sum(after[c][0] - before[c][0] + after[c][1] - before[c][1] for c in after) / 0.5
        if busy < 0.1 or time.monotonic() > deadline:
            return
        if not said:
            print(f"  (waiting up to {timeout:.0f} s: other processes use {busy:.0%} of a CPU)", flush=True)
            said = True


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def ensure_tools() -> None:
    missing = [p for p, ok in (("nginx", shutil.which("nginx")), ("wrk", shutil.which("wrk"))) if not ok]
    if missing or not all(m.exists() for m in (ECHO_MODULE, NDK_MODULE, LUA_MODULE)):
        print(f"installing {' '.join(APT_PACKAGES)} with apt-get ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", *APT_PACKAGES], check=True, env=env)
    if not shutil.which("taskset"):
        raise SystemExit("taskset (util-linux) is required")
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 CPUs: contender on CPU 0, load on CPU 1")


class Nginx:
    def __init__(self, name: str, workdir: Path, slow: bool, cpu: str, access_log: bool) -> None:
        self.prefix = workdir / name
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_log = self.prefix / "access.log" if access_log else None
        conf = self.prefix / "nginx.conf"
        conf.write_text(render_nginx_conf(self.prefix, self.port, slow, self.access_log))
        argv = ["nginx", "-p", str(self.prefix), "-c", str(conf), "-e", "stderr"]
        check = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"nginx config test failed:\n{check.stderr}")
        self.proc = spawn(name, argv, workdir, cpu)
        wait_port(self.proc, self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_offset(self) -> int:
        return self.access_log.stat().st_size if self.access_log and self.access_log.exists() else 0

    def served_since(self, offset: int) -> dict[str, tuple[int, int]]:
        """location -> (complete 200s, other) from the access log written after `offset`."""
        counts: dict[str, tuple[int, int]] = {}
        if not self.access_log:
            return counts
        with self.access_log.open("rb") as fh:
            fh.seek(offset)
            for line in fh.read().decode().splitlines():
                status, completion, _sent, uri = [*line.split(" "), "", "", "", ""][:4]
                done, other = counts.get(uri, (0, 0))
                if status == "200" and completion == "OK":
                    counts[uri] = (done + 1, other)
                else:
                    counts[uri] = (done, other + 1)
        return counts

    def stop(self) -> None:
        self.proc.stop(sig=signal.SIGQUIT)


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
        "--log-level",
        "warning",
    ]


def start_bare(mode: str, upstream: Nginx, workdir: Path) -> Contender:
    port = free_port()
    env = dict(os.environ, BARE_MODE=mode, BARE_UPSTREAM=upstream.url)
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(BENCH), "--factory", "bare:create_app"]
    proc = spawn(f"bare-{mode}", argv + uvicorn_flags(port), workdir, CONTENDER_CPU, env)
    wait_port(proc, port)
    return Contender(f"bare-{mode}", port, proc, prefixed=True)


GATEWAY_TOML = """\
# bench/run.py: unlimited plan, rate limits that are never hit.
[plan]

[rate_limit]
requests_per_minute = 100000000
tokens_per_minute = 100000000000
"""


def gateway_env(workdir: Path, port: int, upstream: Nginx) -> dict[str, str]:
    gwdir = workdir / "gateway"
    gwdir.mkdir(exist_ok=True)
    config = gwdir / "gateway.toml"
    config.write_text(GATEWAY_TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "POLAR_"))}
    env.update(
        GATEWAY_DATABASE_URL=f"sqlite:///{gwdir / 'bench.db'}",
        GATEWAY_CONFIG=str(config),
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(port),
        GATEWAY_ANTHROPIC_UPSTREAM=upstream.url,
        GATEWAY_GEMINI_UPSTREAM=upstream.url,
        ANTHROPIC_API_KEY="sk-bench",
        GEMINI_API_KEY="bench",
        GATEWAY_ADMIN_TOKEN="bench",
    )
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


def start_gateway(upstream: Nginx, workdir: Path, cells: Sequence[Cell]) -> Contender:
    port = free_port()
    env = gateway_env(workdir, port, upstream)
    gateway_cli(env, "migrate")
    keys: dict[str, str] = {}
    users: dict[str, str] = {}
    for i, cell in enumerate(cells):
        created = last_json(gateway_cli(env, "keys", "create", "--user", f"bench-user-{i}", "--json"))
        assert isinstance(created, dict), created
        keys[cell.name] = str(created["key"])
        users[cell.name] = str(created.get("user_id", f"bench-user-{i}"))
    proc = spawn("gateway", [sys.executable, "-m", "gateway", "serve"], workdir, CONTENDER_CPU, env)
    wait_port(proc, port, timeout=60)
    return Contender("gateway", port, proc, prefixed=True, keys=keys, users=users)


def start_direct(workdir: Path, slow: bool) -> Contender:
    nginx = Nginx("direct", workdir, slow, CONTENDER_CPU, access_log=False)
    return Contender("direct", nginx.port, None, prefixed=False, nginx=nginx)


# --- load ----------------------------------------------------------------------------------


@dataclass
class Result:
    contender: str
    cell: Cell
    ok: int = 0
    duration_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    requests: int = 0  # everything wrk completed in the window, good or not
    errors: dict[str, int] = field(default_factory=dict)
    rss_mb: float = 0.0
    preflight: str = ""  # "" when the single request returned the exact fixture bytes
    warm_ok: int = 0  # good responses outside the measured window (preflight + warm-up)
    upstream: dict[str, tuple[int, int]] = field(default_factory=dict)
    skipped: str = ""
    foreign: dict[str, float] = field(default_factory=dict)  # CPU -> share used by other processes
    steal: dict[str, float] = field(default_factory=dict)  # CPU -> share stolen by the hypervisor
    busy: dict[str, float] = field(default_factory=dict)  # CPU -> user+system share (all processes)

    @property
    def disturbed(self) -> str:
        """'' when the cell ran on a quiet machine, else what disturbed it."""
        parts = [f"CPU {c}: {v:.0%} other processes" for c, v in sorted(self.foreign.items()) if v > FOREIGN_LIMIT]
        parts += [f"CPU {c}: {v:.0%} steal" for c, v in sorted(self.steal.items()) if v > FOREIGN_LIMIT]
        return "; ".join(parts)

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def preflight(contender: Contender, cell: Cell, slow: bool) -> str:
    """One request with the cell's headers: '' when it returns 200 and the exact fixture bytes."""
    fx = cell.fixture
    script = (BENCH / "wrk" / f"{fx.name}.lua").read_text()
    path = re.search(r'path = "([^"]+)"', script)
    body = re.search(r"body = '([^']+)'", script)
    assert path and body, f"cannot read path/body from {fx.name}.lua"
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    headers["x-api-key" if fx.provider == "anthropic" else "x-goog-api-key"] = contender.key(cell)
    if fx.name == "anthropic_sse":
        headers["anthropic-beta"] = "bench-sse"
    conn = http.client.HTTPConnection("127.0.0.1", contender.port, timeout=30)
    try:
        conn.request("POST", contender.prefix(fx) + path.group(1), body=body.group(1).encode(), headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"request failed: {exc!r}"
    finally:
        conn.close()
    if resp.status != 200:
        return f"HTTP {resp.status}: {data[:300]!r}"
    if data != fx.served(slow):
        return f"body differs from the fixture ({len(data)} bytes, expected {len(fx.served(slow))})"
    return ""


def run_wrk(contender: Contender, cell: Cell, duration: float, expect: Path, logdir: Path) -> dict[str, int]:
    fx = cell.fixture
    env = dict(
        os.environ,
        BENCH_PREFIX=contender.prefix(fx),
        BENCH_KEY=contender.key(cell),
        BENCH_EXPECT_FILE=str(expect),
        BENCH_WRK_DIR=str(BENCH / "wrk"),
    )
    argv = [
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t1",
        f"-c{cell.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(BENCH / "wrk" / f"{fx.name}.lua"),
        f"http://127.0.0.1:{contender.port}",
    ]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=ROOT)
    with (logdir / "wrk.log").open("a") as fh:
        fh.write(f"### {contender.name} {cell.name}\n{' '.join(argv)}\n{out.stdout}{out.stderr}\n")
    match = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return dict(json.loads(match.group(1)))


def run_cell(
    contender: Contender,
    cell: Cell,
    args: argparse.Namespace,
    upstream: Nginx,
    expect: Path,
    logdir: Path,
) -> Result:
    result = Result(contender.name, cell)
    offset = upstream.log_offset()
    result.preflight = preflight(contender, cell, args.slow)
    if result.preflight.startswith(("HTTP", "request failed")):
        result.skipped = result.preflight
        return result
    extra_ok = 0 if result.preflight else 1  # good responses outside the reported window
    for attempt in range(1 + args.retries):
        wait_quiet(args.quiet_timeout)
        if args.warmup > 0:
            extra_ok += int(run_wrk(contender, cell, args.warmup, expect, logdir)["ok"])
        with CpuWindow(contender.pid, [upstream.proc.pid]) as cpu:
            raw = run_wrk(contender, cell, args.duration, expect, logdir)
        result.foreign, result.steal, result.busy = cpu.foreign, cpu.steal, cpu.busy
        if not result.disturbed or attempt == args.retries:
            break
        extra_ok += int(raw["ok"])
        print(f"  {cell.name:<18} disturbed ({result.disturbed}): measuring again", flush=True)
    result.warm_ok = extra_ok
    result.ok = raw["ok"]
    result.requests = raw["requests"]
    result.mean_ms = raw["mean_us"] / 1000
    result.duration_s = raw["duration_us"] / 1e6
    result.p50_ms, result.p90_ms, result.p99_ms = (raw[k] / 1000 for k in ("p50_us", "p90_us", "p99_us"))
    result.errors = {
        k: int(raw[k]) for k in ("bad_status", "bad_body", "connect", "read", "write", "timeout") if raw[k]
    }
    time.sleep(args.settle)  # let the contender finish (and meter) what wrk left in flight
    result.rss_mb = peak_rss_mb(contender.pid)
    if contender.name != "direct":
        result.upstream = upstream.served_since(offset)
    return result


def print_result(r: Result, slow: bool) -> None:
    if r.skipped:
        print(f"  {r.cell.name:<18} SKIPPED: {r.skipped}", flush=True)
        return
    extra = f"  steady {steady_rate(r):.0f} rps = {ideal_share(r):.1%} of ideal" if slow else ""
    errors = f"  errors {r.errors}" if r.errors else ""
    note = f"  WARNING preflight: {r.preflight}" if r.preflight else ""
    cpu = "  cpu " + " ".join(f"{c}:{v:.0%}" for c, v in sorted(r.busy.items()))
    if r.disturbed:
        note += f"  DISTURBED ({r.disturbed})"
    print(
        f"  {r.cell.name:<18} {r.rps:>9.0f} rps  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
        f"  peak RSS {r.rss_mb:6.1f} MB{cpu}{extra}{errors}{note}",
        flush=True,
    )


def ideal_rate(cell: Cell) -> float:
    return cell.connections / ideal_latency(cell.fixture)


def steady_rate(r: Result) -> float:
    """Closed-loop steady-state rate (Little's law): connections / mean latency, good responses only.

    wrk's own RPS undercounts slow cells: each connection's last request is cut off at the end of
    the window (up to 600 ms of 10 s for a stream), so the slow-mode target uses this instead.
    """
    if not r.mean_ms or not r.requests:
        return 0.0
    return r.cell.connections / (r.mean_ms / 1000) * (r.ok / r.requests)


def ideal_share(r: Result) -> float:
    return steady_rate(r) / ideal_rate(r.cell)


# --- meter check ---------------------------------------------------------------------------


@dataclass
class MeterRow:
    cell: str
    meter: str
    served: int  # complete 200s the upstream served for this cell's key
    client_ok: int  # good responses wrk (and the preflight) saw
    expected: int
    recorded: int

    @property
    def ok(self) -> bool:
        return self.expected == self.recorded


def check_meters(contender: Contender, results: list[Result], env: dict[str, str]) -> tuple[list[MeterRow], str]:
    try:
        usage = last_json(gateway_cli(env, "usage", "--json"))
    except (RuntimeError, ValueError) as exc:
        return [], f"skipped: `python -m gateway usage --json` is not usable yet ({str(exc).strip()[:300]})"
    assert isinstance(usage, list), usage
    totals: dict[tuple[str, str], int] = {}
    for row in usage:
        key = (str(row["user_id"]), str(row["meter"]))
        totals[key] = totals.get(key, 0) + int(row["total"])
    rows: list[MeterRow] = []
    for r in results:
        if r.skipped:
            continue
        fx = r.cell.fixture
        served = r.upstream.get(f"/_bench/{fx.name}", (0, 0))[0]
        user = contender.users[r.cell.name]
        meters = set(fx.usage) | {m for (u, m), t in totals.items() if u == user and t}
        for meter in sorted(meters):
            per_request = fx.usage.get(meter, 0)
            recorded = totals.get((user, meter), 0)
            rows.append(MeterRow(r.cell.name, meter, served, r.ok + r.warm_ok, served * per_request, recorded))
    return rows, ""


# --- report --------------------------------------------------------------------------------


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "—"


def versions() -> str:
    def ver(cmd: list[str], pattern: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        m = re.search(pattern, out.stdout + out.stderr)
        return m.group(1) if m else "?"

    import aiohttp
    import starlette
    import uvicorn

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        m = re.search(r"model name\s*:\s*(.*)", fh.read())
        cpu = m.group(1).strip() if m else "?"
    nginx = ver(["nginx", "-v"], r"nginx/(\S+)")
    wrk = ver(["wrk", "-v"], r"wrk (\S+)")
    return (
        f"{os.cpu_count()} x {cpu}; Python {platform.python_version()}, uvicorn {uvicorn.__version__} "
        f"(uvloop, httptools), starlette {starlette.__version__}, aiohttp {aiohttp.__version__}, "
        f"nginx {nginx}, wrk {wrk}"
    )


def git_rev() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() + (" (dirty tree)" if dirty.stdout.strip() else "")


def render_report(
    results: dict[str, list[Result]],
    cells: list[Cell],
    args: argparse.Namespace,
    meter_rows: list[MeterRow],
    meter_note: str,
    notes: list[str],
) -> str:
    by = {(r.contender, r.cell.name): r for rs in results.values() for r in rs}
    ran = [c for c in CONTENDERS if c in results]
    mode = f"slow upstream ({SLOW_CONNECTIONS} connections)" if args.slow else "fast upstream"
    lines = [
        f"# Benchmark results: {mode}",
        "",
        f"`{' '.join(['python', 'bench/run.py', *sys.argv[1:]])}` on "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, commit {git_rev()}.",
        f"{versions()}.",
        f"Contender pinned to CPU {CONTENDER_CPU}; wrk (1 thread) and the nginx upstream on CPU {LOAD_CPU}. "
        f"{args.duration:g} s per cell after a {args.warmup:g} s warm-up. RPS counts only 200s whose body is "
        "byte-identical to the fixture; peak RSS is VmHWM (cumulative over the contender's cells).",
        "",
    ]
    if args.slow:
        lines += [
            f"JSON answers after {SLOW_JSON_DELAY * 1000:.0f} ms, streams have {SLOW_EVENTS} events "
            f"{SLOW_EVENT_GAP * 1000:.0f} ms apart (600 ms). Steady RPS = connections / mean latency x "
            "good share (Little's law; wrk's RPS loses each connection's last, cut-off request); ideal = "
            f"connections / nominal latency. Target: >= {TARGET_SLOW:.0%} of ideal.",
            "",
        ]
    head = "| Cell | Conns | Contender | RPS | p50 ms | p99 ms | Peak RSS MB | CPU 0 busy | Errors | gateway / this |"
    if args.slow:
        head = head[:-1] + " steady RPS | % of ideal |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for cell in cells:
        gw = by.get(("gateway", cell.name))
        for name in ran:
            r = by.get((name, cell.name))
            if r is None:
                continue
            if r.skipped:
                lines.append(f"| {cell.label} | {cell.connections} | {name} | skipped: {r.skipped[:80]} |")
                continue
            errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
            if r.preflight:
                errors += f" ({r.preflight[:60]})"
            ratio = fmt_ratio(gw.rps, r.rps) if gw and not gw.skipped and name != "gateway" else ""
            row = (
                f"| {cell.label} | {cell.connections} | {name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                f"| {r.rss_mb:.1f} | {r.busy.get(CONTENDER_CPU, 0.0):.0%} | {errors} | {ratio} |"
            )
            if args.slow:
                row += f" {steady_rate(r):,.0f} | {ideal_share(r):.1%} |"
            lines.append(row)
    lines += ["", "## Targets", ""]
    lines += targets(by, cells, ran, args.slow)
    if "gateway" in results:
        lines += ["", "## Meter check", ""]
        if meter_note:
            lines.append(meter_note)
        else:
            lines += [
                "Upstream-served = complete 200s in the fake upstream's access log for the cell's key "
                "(preflight + warm-up + measured; the gateway drains what wrk abandons at the end). "
                "Expected = upstream-served x the fixture's usage.",
                "",
                "| Cell | Meter | Upstream-served | Client-seen OK | Expected | Recorded | OK |",
                "|---|---|---|---|---|---|---|",
            ]
            for m in meter_rows:
                lines.append(
                    f"| {m.cell} | {m.meter} | {m.served} | {m.client_ok} | {m.expected} | {m.recorded} "
                    f"| {'yes' if m.ok else '**NO**'} |"
                )
    notes = list(notes)
    for name in ran:
        for r in results[name]:
            if r.disturbed:
                notes.append(f"{name} {r.cell.name} ran on a busy machine ({r.disturbed}): rerun it.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def targets(by: dict[tuple[str, str], Result], cells: list[Cell], ran: list[str], slow: bool) -> list[str]:
    out: list[str] = []
    gw_ok = [by[("gateway", c.name)] for c in cells if ("gateway", c.name) in by]
    gw_ok = [r for r in gw_ok if not r.skipped]
    if not gw_ok:
        out.append("- gateway: not measured in this run.")
    if slow:
        for name in ran:
            rs = [by[(name, c.name)] for c in cells if (name, c.name) in by and not by[(name, c.name)].skipped]
            worst = min((ideal_share(r) for r in rs), default=0.0)
            flag = "PASS" if worst >= TARGET_SLOW else "FAIL"
            out.append(f"- {name}: worst cell {worst:.1%} of ideal (target >= {TARGET_SLOW:.0%}): {flag}")
        return out
    for r in gw_ok:
        bare = [by[(b, r.cell.name)] for b in BARE if (b, r.cell.name) in by]
        bare = [b for b in bare if not b.skipped]
        if bare:
            best = max(bare, key=lambda b: b.rps)
            ratio = r.rps / best.rps if best.rps else 0.0
            flag = "PASS" if ratio >= TARGET_RATIO else "FAIL"
            out.append(
                f"- {r.cell.label} @{r.cell.connections}: gateway {ratio:.2f}x of the fastest bare "
                f"({best.contender}), target >= {TARGET_RATIO}x: {flag}"
            )
        if r.cell.connections == 16:
            flag = "PASS" if r.p99_ms <= TARGET_P99_MS else "FAIL"
            out.append(f"- {r.cell.label} @16: gateway p99 {r.p99_ms:.2f} ms, target <= {TARGET_P99_MS:.0f} ms: {flag}")
    if gw_ok:
        rss = max(r.rss_mb for r in gw_ok)
        flag = "PASS" if rss <= TARGET_RSS_MB else "FAIL"
        out.append(f"- gateway peak RSS {rss:.1f} MB, target <= {TARGET_RSS_MB:.0f} MB: {flag}")
    # The fake upstream must never be the bottleneck: direct (nginx alone on one CPU) must serve
    # >= 10x the gateway (the issue's rule; the fastest Python contender when there is no gateway).
    for cell in cells:
        direct = by.get(("direct", cell.name))
        pythons = [by[(n, cell.name)] for n in ("gateway", *BARE) if (n, cell.name) in by]
        pythons = [p for p in pythons if not p.skipped and p.rps]
        if not direct or direct.skipped or not pythons:
            continue
        ref = next((p for p in pythons if p.contender == "gateway"), max(pythons, key=lambda p: p.rps))
        fastest = max(pythons, key=lambda p: p.rps)
        headroom = direct.rps / ref.rps
        flag = "ok" if headroom >= 10 else "TOO LOW: the upstream may be the bottleneck"
        also = f"; {direct.rps / fastest.rps:.1f}x {fastest.contender}" if fastest is not ref else ""
        out.append(
            f"- upstream headroom {cell.label} @{cell.connections}: direct {direct.rps:,.0f} rps = "
            f"{headroom:.1f}x {ref.contender}{also} (target >= 10x): {flag}"
        )
    return out


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the gateway against direct and bare pass-throughs.")
    p.add_argument("--quick", action="store_true", help="3 s per cell (default 10 s)")
    p.add_argument("--duration", type=float, help="seconds per cell (default 10, --quick 3)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell, not measured (default 1)")
    p.add_argument("--slow", action="store_true", help="slow-upstream mode: 250 ms JSON, 31x20 ms streams, 256 conns")
    p.add_argument("--out", type=Path, help="markdown output (default bench/results.md, --slow bench/results_slow.md)")
    p.add_argument(
        "--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    p.add_argument("--cells", default="", help="comma-separated subset of cell names, e.g. anthropic_json@16")
    p.add_argument("--retries", type=int, default=1, help="measure a cell again when other load disturbed it")
    p.add_argument("--quiet-timeout", type=float, default=15, help="max seconds to wait for a quiet machine per cell")
    p.add_argument("--update-readme", action="store_true", help="paste the report into bench/README.md")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, nginx config, gateway db)")
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = 1.0 if args.warmup is None else args.warmup
    args.settle = 1.5 if args.slow else 0.5
    args.out = args.out or BENCH / ("results_slow.md" if args.slow else "results.md")
    args.contender_list = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contender_list) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    return args


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="polar-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools()
    cells = slow_cells() if args.slow else fast_cells()
    if args.cells:
        wanted = {c.strip() for c in args.cells.split(",")}
        cells = [c for c in cells if c.name in wanted]
        if not cells:
            raise SystemExit(f"no cell matches {args.cells!r}")
    notes: list[str] = []
    results: dict[str, list[Result]] = {}
    meter_rows: list[MeterRow] = []
    meter_note = ""
    with workdir(args.keep) as tmp:
        expect = {}
        for fx in FIXTURE_LIST:
            expect[fx.name] = tmp / f"expect_{fx.name}"
            expect[fx.name].write_bytes(fx.served(args.slow))
        upstream = Nginx("upstream", tmp, args.slow, LOAD_CPU, access_log=True)
        print(f"fake upstream (nginx) on {upstream.url}, pinned to CPU {LOAD_CPU}; work dir {tmp}", flush=True)
        try:
            for name in args.contender_list:
                contender: Contender | None = None
                if name == "gateway":
                    why = gateway_available()
                    if why:
                        msg = f"gateway skipped: {why}"
                        print(msg, flush=True)
                        notes.append(msg)
                        continue
                try:
                    if name == "direct":
                        contender = start_direct(tmp, args.slow)
                    elif name in BARE:
                        contender = start_bare(name.removeprefix("bare-"), upstream, tmp)
                    else:
                        contender = start_gateway(upstream, tmp, cells)
                    print(f"{name} on :{contender.port} (pid {contender.pid}, CPU {CONTENDER_CPU})", flush=True)
                    results[name] = []
                    for cell in cells:
                        r = run_cell(contender, cell, args, upstream, expect[cell.fixture.name], tmp)
                        print_result(r, args.slow)
                        results[name].append(r)
                except RuntimeError as exc:
                    msg = f"{name} failed: {exc}"
                    print(msg, flush=True)
                    notes.append(msg.splitlines()[0])
                finally:
                    if contender:
                        contender.stop()
                if name == "gateway" and contender and name in results:
                    env = gateway_env(tmp, contender.port, upstream)
                    meter_rows, meter_note = check_meters(contender, results[name], env)
                    print_meters(meter_rows, meter_note)
        finally:
            upstream.stop()
        report = render_report(results, cells, args, meter_rows, meter_note, notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print()
    print(report)
    print(f"wrote {args.out}")
    if args.update_readme:
        update_readme(report, args.slow)
    return 1 if any(not m.ok for m in meter_rows) else 0


def update_readme(report: str, slow: bool) -> None:
    """Replace the README's results (or results-slow) section with `report`, headings demoted."""
    readme = BENCH / "README.md"
    tag = "results-slow" if slow else "results"
    begin, end_marker = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = readme.read_text()
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        print(f"{readme}: no {begin} ... {end_marker} section, not updated")
        return
    body = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 2) + " ", report, flags=re.M)
    readme.write_text(text[: start + len(begin)] + "\n" + body + text[end:])
    print(f"updated {readme}")


def print_meters(rows: list[MeterRow], note: str) -> None:
    if note:
        print(f"meter check {note}", flush=True)
        return
    bad = [m for m in rows if not m.ok]
    print(f"meter check: {len(rows) - len(bad)}/{len(rows)} meter totals match", flush=True)
    for m in bad:
        print(
            f"  MISMATCH {m.cell} {m.meter}: recorded {m.recorded}, expected {m.expected} "
            f"({m.served} upstream-served, {m.client_ok} client-seen)",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
