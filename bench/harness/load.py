"""Driving a contender with wrk: the preflight request, one measured cell, its result and rates."""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .contenders import Contender
from .fixtures import Cell, ideal_latency
from .processes import CpuWindow, peak_rss_mb, wait_quiet
from .settings import BENCH, FOREIGN_LIMIT, LOAD_CPU, ROOT
from .upstream import Nginx

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
    max_ms: float = 0.0
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
    contender_cpu_s: float = 0.0  # CPU seconds the contender used in the window
    service_cpu_s: float = 0.0  # ... and the PostgreSQL backends working for it (gateway-pg)
    wall_s: float = 0.0  # the CPU window's length
    load_cpu_s: float = 0.0  # CPU wrk and the upstream used in the window
    rounds: list[float] = field(default_factory=list)  # RPS of each round (merge_rounds), in round order

    @property
    def cpu_us_per_request(self) -> float:
        """The contender's CPU per completed request: steadier than RPS on a shared machine."""
        return 1e6 * self.contender_cpu_s / self.requests if self.requests else 0.0

    @property
    def service_us_per_request(self) -> float:
        return 1e6 * self.service_cpu_s / self.requests if self.requests else 0.0

    @property
    def contender_share(self) -> float:
        """The contender's CPU in the window, in CPUs (2 workers can reach 2.0)."""
        return self.contender_cpu_s / self.wall_s if self.wall_s else 0.0

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


def cell_request(contender: Contender, cell: Cell) -> tuple[str, bytes, dict[str, str]]:
    """The cell's request as the wrk script sends it: (path with the contender's prefix, body, headers)."""
    fx = cell.fixture
    script = (BENCH / "wrk" / f"{fx.name}.lua").read_text()
    path = re.search(r'path = "([^"]+)"', script)
    body = re.search(r"body = '([^']+)'", script)
    assert path and body, f"cannot read path/body from {fx.name}.lua"
    headers = {"Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    headers["x-api-key" if fx.provider == "anthropic" else "x-goog-api-key"] = contender.key(cell)
    if fx.name == "anthropic_sse":
        headers["anthropic-beta"] = "bench-sse"
    return contender.prefix(fx) + path.group(1), body.group(1).encode(), headers


def raw_request(contender: Contender, cell: Cell) -> bytes:
    """The cell's request as HTTP/1.1 bytes (keep-alive), for the raw-socket clients."""
    path, body, headers = cell_request(contender, cell)
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{contender.port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def preflight(contender: Contender, cell: Cell, slow: bool) -> str:
    """One request with the cell's headers: '' when it returns 200 and the exact fixture bytes."""
    fx = cell.fixture
    path, body, headers = cell_request(contender, cell)
    conn = http.client.HTTPConnection("127.0.0.1", contender.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
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
        services = contender.service_pids()
        with CpuWindow(contender.pid, [upstream.proc.pid], contender.cpus, services) as cpu:
            raw = run_wrk(contender, cell, args.duration, expect, logdir)
        result.foreign, result.steal, result.busy = cpu.foreign, cpu.steal, cpu.busy
        result.contender_cpu_s, result.service_cpu_s, result.wall_s = (
            cpu.contender_seconds,
            cpu.service_seconds,
            cpu.wall,
        )
        result.load_cpu_s = cpu.load_seconds
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
    result.max_ms = raw["max_us"] / 1000
    result.errors = {
        k: int(raw[k]) for k in ("bad_status", "bad_body", "connect", "read", "write", "timeout") if raw[k]
    }
    time.sleep(args.settle)  # let the contender finish (and meter) what wrk left in flight
    result.rss_mb = peak_rss_mb(contender.pid)
    if contender.name != "direct":
        result.upstream = upstream.served_since(offset)
    return result


def merge_rounds(rs: list[Result]) -> Result:
    """One row for a contender's rounds on a cell: the median round's figures (by RPS), with the
    traffic of every round (for the meter check) and the per-round RPS (for paired ratios)."""
    done = [r for r in rs if not r.skipped]
    if not done:
        return rs[-1]
    ranked = sorted(done, key=lambda r: r.rps)
    rep = dataclasses.replace(ranked[(len(ranked) - 1) // 2])
    rep.rounds = [r.rps for r in done]
    rep.warm_ok = sum(r.ok + r.warm_ok for r in done) - rep.ok
    rep.rss_mb = max(r.rss_mb for r in done)
    upstream: dict[str, tuple[int, int]] = {}
    for r in done:
        for path, (n, m) in r.upstream.items():
            a, b = upstream.get(path, (0, 0))
            upstream[path] = (a + n, b + m)
    rep.upstream = upstream
    return rep


def round_ratios(a: Result, b: Result) -> list[float]:
    """a's RPS over b's in each round (rounds where b served nothing left out)."""
    return [x / y for x, y in zip(a.rounds, b.rounds, strict=False) if y]


def paired_ratio(a: Result, b: Result) -> float:
    """a's RPS over b's: the median of the per-round ratios (each round measures both seconds
    apart, so a drift of the shared machine over minutes cancels), else the plain ratio."""
    pairs = [p for p in round_ratios(a, b) if p]
    if pairs:
        return statistics.median(pairs)
    return a.rps / b.rps if a.rps and b.rps else 0.0


def print_result(r: Result, slow: bool) -> None:
    if r.skipped:
        print(f"  {r.cell.name:<18} SKIPPED: {r.skipped}", flush=True)
        return
    extra = f"  steady {steady_rate(r):.0f} rps = {ideal_share(r):.1%} of ideal" if slow else ""
    errors = f"  errors {r.errors}" if r.errors else ""
    note = f"  WARNING preflight: {r.preflight}" if r.preflight else ""
    cpu = "  cpu " + " ".join(f"{c}:{v:.0%}" for c, v in sorted(r.busy.items())) + f" own:{r.contender_share:.0%}"
    if r.service_cpu_s:
        cpu += f" pg:{r.service_us_per_request:.0f}us/req"
    if r.disturbed:
        note += f"  DISTURBED ({r.disturbed})"
    print(
        f"  {r.cell.name:<18} {r.rps:>9.0f} rps  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
        f"  peak RSS {r.rss_mb:6.1f} MB{cpu}  {r.cpu_us_per_request:.0f} us CPU/req{extra}{errors}{note}",
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
