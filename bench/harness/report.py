"""The markdown report: results table, targets, meter check, notes; and the README update."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime

from .cancel import CancelResult, render_cancel
from .fixtures import Cell
from .load import Result, ideal_share, paired_ratio, round_ratios, steady_rate
from .meters import MeterRow
from .settings import (
    BARE,
    BARE_W2,
    BENCH,
    BOTH_CPUS,
    CONTENDER_CPU,
    CONTENDERS,
    GATEWAYS,
    LOAD_CPU,
    ROOT,
    SLOW_CONNECTIONS,
    SLOW_EVENT_GAP,
    SLOW_EVENTS,
    SLOW_JSON_DELAY,
    TARGET_MAX_MS,
    TARGET_P99_MS,
    TARGET_PG,
    TARGET_RATIO,
    TARGET_RSS_MB,
    TARGET_SLOW,
    TARGET_WORKERS,
    TTFB_WARMUP,
)
from .ttfb import TtfbResult, render_ttfb

# --- report --------------------------------------------------------------------------------


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
    ttfb: list[TtfbResult] | None = None,
    cancel: list[CancelResult] | None = None,
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
        f"{rounds_text(args)} RPS counts only 200s whose body is "
        "byte-identical to the fixture; peak RSS is VmHWM (cumulative over the contender's cells).",
        "",
    ]
    lines += variants_text(ran)
    if args.slow:
        lines += [
            f"JSON answers after {SLOW_JSON_DELAY * 1000:.0f} ms, streams have {SLOW_EVENTS} events "
            f"{SLOW_EVENT_GAP * 1000:.0f} ms apart (600 ms). Steady RPS = connections / mean latency x "
            "good share (Little's law; wrk's RPS loses each connection's last, cut-off request); ideal = "
            f"connections / nominal latency. Target: >= {TARGET_SLOW:.0%} of ideal.",
            "",
        ]
    head = (
        "| Cell | Conns | Contender | RPS | p50 ms | p99 ms | max ms | Peak RSS MB | Contender CPU | CPU µs/req"
        " | Errors | gateway / this |"
    )
    if args.slow:
        head += " steady RPS | % of ideal |"
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
            ratio = ""
            if gw and not gw.skipped and name not in (*GATEWAYS, BARE_W2) and (x := paired_ratio(gw, r)):
                ratio = f"{x:.2f}x"
            row = (
                f"| {cell.label} | {cell.connections} | {name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                f"| {r.max_ms:.1f} "
                f"| {r.rss_mb:.1f} | {r.contender_share:.0%} | {cpu_text(r)} "
                f"| {errors} | {ratio} |"
            )
            if args.slow:
                row += f" {steady_rate(r):,.0f} | {ideal_share(r):.1%} |"
            lines.append(row)
    lines += ["", "## Targets", ""]
    lines += targets(by, cells, ran, args.slow)
    if not args.slow:
        lines += scaling_targets(by, cells)
    lines += render_ttfb(ttfb or [], args.ttfb_requests, TTFB_WARMUP)
    lines += render_cancel(cancel or [], args.warmup, args.settle)
    if any(name in GATEWAYS for name in results):
        lines += ["", "## Meter check", ""]
        if meter_note:
            lines.append(meter_note)
        else:
            lines += [
                "Upstream-served = complete 200s in the fake upstream's access log for the cell's key "
                "(preflight + warm-up + measured; the gateway drains what wrk abandons at the end). "
                "Expected = upstream-served x the fixture's usage.",
                "",
                "| Contender | Cell | Meter | Upstream-served | Client-seen OK | Expected | Recorded | OK |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for m in meter_rows:
                lines.append(
                    f"| {m.contender} | {m.cell} | {m.meter} | {m.served} | {m.client_ok} | {m.expected} "
                    f"| {m.recorded} | {'yes' if m.ok else '**NO**'} |"
                )
    notes = list(notes)
    for name in ran:
        for r in results[name]:
            if r.disturbed:
                notes.append(f"{name} {r.cell.name} ran on a busy machine ({r.disturbed}): rerun it.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def variants_text(ran: list[str]) -> list[str]:
    out = []
    if "gateway-pg" in ran or "gateway-pg-redis" in ran:
        out.append(
            f"`gateway-pg`: one worker on CPU {CONTENDER_CPU} like `gateway`, with the PostgreSQL store (a fresh "
            "database on the local server, dropped after the run); the server's backends for that database are "
            f"pinned to CPU {LOAD_CPU} with the load, and their CPU per request is shown after the gateway's "
            "(`gateway + pg`), as a database on its own machine would carry it."
        )
    if "gateway-w2" in ran or "gateway-w2-redis" in ran:
        out.append(
            f"`gateway-w2`: `gateway serve --workers 2` on SQLite, on CPUs {BOTH_CPUS}: the two workers share "
            f"CPU {LOAD_CPU} with wrk and the upstream, so they get less than two whole CPUs; `Contender CPU` "
            "is the workers' CPU in CPUs (200 % = both)."
        )
    if any(name.endswith("-redis") for name in ran):
        out.append("`-redis`: the same with `GATEWAY_REDIS_URL` (rate limits in the local Redis, unpinned).")
    return [*out, ""] if out else []


def cpu_text(r: Result) -> str:
    text = f"{r.cpu_us_per_request:.0f}"
    return text + f" + pg {r.service_us_per_request:.0f}" if r.service_cpu_s else text


def scaling_targets(by: dict[tuple[str, str], Result], cells: list[Cell]) -> list[str]:
    """Two workers over one, PostgreSQL over SQLite: paired per round like the other ratios."""
    out: list[str] = []
    for name, target, what in (
        ("gateway-w2", TARGET_WORKERS, "two workers / one"),
        ("gateway-w2-redis", TARGET_WORKERS, "two workers, rate limits in Redis / one"),
        ("gateway-pg", TARGET_PG, "PostgreSQL / SQLite"),
        ("gateway-pg-redis", TARGET_PG, "PostgreSQL, rate limits in Redis / SQLite"),
    ):
        for cell in cells:
            one, other = by.get(("gateway", cell.name)), by.get((name, cell.name))
            if not one or not other or one.skipped or other.skipped:
                continue
            ratio = paired_ratio(other, one)
            each = ""
            if len(one.rounds) > 1:
                each = " (rounds: " + ", ".join(f"{x:.2f}" for x in round_ratios(other, one)) + ")"
            flag = "PASS" if ratio >= target else "FAIL"
            # CPU per request moves far less than RPS on a shared machine: its inverse is the throughput
            # per core (PostgreSQL: the gateway's own, and with the database backends' added).
            per_core = one.cpu_us_per_request / other.cpu_us_per_request if other.cpu_us_per_request else 0.0
            cpu = f"{one.cpu_us_per_request:.0f} -> {other.cpu_us_per_request:.0f} µs"
            if other.service_cpu_s:
                total = other.cpu_us_per_request + other.service_us_per_request
                cpu += f" (+ pg {other.service_us_per_request:.0f} = {one.cpu_us_per_request / total:.2f}x)"
            shares = ""
            if other.contender_share > 1 and other.wall_s:
                load = other.load_cpu_s / other.wall_s
                shares = f"; CPU used: the workers {other.contender_share:.0%}, wrk + upstream {load:.0%}"
            out.append(
                f"- {cell.label} @{cell.connections}: {what} ({name} / gateway) {ratio:.2f}x{each}, "
                f"target >= {target}x: {flag}; CPU per request {cpu}, throughput per core {per_core:.2f}x{shares}"
            )
    for cell in cells:
        one, two = by.get(("bare-raw", cell.name)), by.get((BARE_W2, cell.name))
        if not one or not two or one.skipped or two.skipped:
            continue
        gw = by.get(("gateway-w2", cell.name))
        vs = f"; gateway-w2 / bare-raw-w2 {paired_ratio(gw, two):.2f}x" if gw and not gw.skipped else ""
        out.append(
            f"- {cell.label} @{cell.connections}: reference, the bare pass-through's two workers / one "
            f"({BARE_W2} / bare-raw) {paired_ratio(two, one):.2f}x on the same CPUs{vs}"
        )
    return out


def rounds_text(args: argparse.Namespace) -> str:
    if args.rounds <= 1:
        return f"{args.duration:g} s per cell after a {args.warmup:g} s warm-up."
    return (
        f"{args.rounds} rounds per cell, each contender {args.duration:g} s per round after a {args.warmup:g} s "
        "warm-up, the contenders' order rotated each round; a row is the contender's median round, a "
        "gateway / this ratio the median of the per-round ratios (a shared VM drifts over minutes)."
    )


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
            ratio = paired_ratio(r, best)
            flag = "PASS" if ratio >= TARGET_RATIO else "FAIL"
            each = ""
            if len(r.rounds) > 1:
                each = " (rounds: " + ", ".join(f"{x:.2f}" for x in round_ratios(r, best)) + ")"
            out.append(
                f"- {r.cell.label} @{r.cell.connections}: gateway {ratio:.2f}x of the fastest bare "
                f"({best.contender}){each}, target >= {TARGET_RATIO}x: {flag}"
            )
        if r.cell.connections == 16:
            flag = "PASS" if r.p99_ms <= TARGET_P99_MS else "FAIL"
            out.append(f"- {r.cell.label} @16: gateway p99 {r.p99_ms:.2f} ms, target <= {TARGET_P99_MS:.0f} ms: {flag}")
            flag = "PASS" if r.max_ms <= TARGET_MAX_MS else "FAIL"
            out.append(f"- {r.cell.label} @16: gateway max {r.max_ms:.1f} ms, target <= {TARGET_MAX_MS:.0f} ms: {flag}")
    if gw_ok:
        rss = max(r.rss_mb for r in gw_ok)
        flag = "PASS" if rss <= TARGET_RSS_MB else "FAIL"
        out.append(f"- gateway peak RSS {rss:.1f} MB, target <= {TARGET_RSS_MB:.0f} MB: {flag}")
    # The fake upstream must never be the bottleneck: direct (nginx alone on one CPU) must serve
    # >= 10x the gateway (the rule; the fastest Python contender when there is no gateway).
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
