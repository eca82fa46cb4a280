"""Cancel burst (slow mode): does the rate hold after a burst of callers hang up mid-stream?

On the slow Anthropic SSE cell: warm up, measure the steady rate with wrk, fire a burst of
streaming requests that disconnect right after the first chunk (event), pause, measure again.
Leaked tasks, upstream connections or ledger entries would show as a lower rate afterwards.
The gateway sends these with its own user, so the meter check's per-cell totals are untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from .contenders import Contender
from .fixtures import Cell
from .load import raw_request, run_wrk
from .processes import wait_quiet
from .settings import CANCEL_BURST, CANCEL_CONTENDERS, CANCEL_WINDOW, CANCEL_WINDOW_QUICK, LOAD_CPU, TARGET_CANCEL
from .ttfb import pinned
from .upstream import Nginx

# --- cancel burst --------------------------------------------------------------------------


@dataclass
class CancelResult:
    contender: str
    cell: Cell
    window_s: float = 0.0
    before: dict[str, int] = field(default_factory=dict)  # wrk's BENCH_RESULT
    after: dict[str, int] = field(default_factory=dict)
    first_chunk: int = 0  # burst requests that got a 200 and their first chunk before hanging up
    burst_s: float = 0.0
    upstream_cut: int = 0  # burst streams the upstream did not finish (the cancel reached it)
    upstream_done: int = 0
    error: str = ""

    def rate(self, raw: dict[str, int]) -> float:
        """Steady rate (Little's law, good responses only), as in the slow table."""
        if not raw.get("mean_us") or not raw.get("requests"):
            return 0.0
        return self.cell.connections / (raw["mean_us"] / 1e6) * (raw["ok"] / raw["requests"])

    @property
    def share(self) -> float:
        before = self.rate(self.before)
        return self.rate(self.after) / before if before else 0.0


async def hang_up(port: int, request: bytes) -> bool:
    """Send one streaming request, read the headers and the first chunk, then disconnect."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        buf = b""
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                size_end = buf.find(b"\r\n", head_end + 4)
                if size_end >= 0 and len(buf) >= size_end + 2 + int(buf[head_end + 4 : size_end], 16):
                    return buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
            data = await reader.read(65536)
            if not data:
                return False
            buf += data
    finally:
        writer.close()


async def burst(port: int, request: bytes, count: int) -> int:
    """`count` concurrent hang-ups; how many saw a 200 and their first chunk."""
    tasks = [asyncio.wait_for(hang_up(port, request), timeout=30) for _ in range(count)]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    return sum(1 for d in done if d is True)


def run_cancel(
    contender: Contender, cell: Cell, args: argparse.Namespace, upstream: Nginx, expect: Path, logdir: Path
) -> CancelResult:
    view = contender.as_user("cancel", cell)
    window = CANCEL_WINDOW_QUICK if args.quick else CANCEL_WINDOW
    result = CancelResult(contender.name, cell, window)
    try:
        wait_quiet(args.quiet_timeout)
        if args.warmup > 0:
            run_wrk(view, cell, args.warmup, expect, logdir)
        result.before = run_wrk(view, cell, window, expect, logdir)
        time.sleep(args.settle)  # what wrk abandoned at the end has finished upstream
        offset = upstream.log_offset()
        t0 = time.monotonic()
        with pinned(LOAD_CPU):
            result.first_chunk = asyncio.run(burst(view.port, raw_request(view, cell), CANCEL_BURST))
        result.burst_s = time.monotonic() - t0
        time.sleep(args.settle)  # longer than a stream: uncancelled upstream streams have ended too
        result.upstream_done, result.upstream_cut = upstream.served_since(offset).get(
            f"/_bench/{cell.fixture.name}", (0, 0)
        )
        result.after = run_wrk(view, cell, window, expect, logdir)
    except (RuntimeError, OSError) as exc:
        result.error = str(exc).splitlines()[0][:200]
    return result


def print_cancel(r: CancelResult) -> None:
    if r.error:
        print(f"  cancel burst {r.cell.name}: FAILED: {r.error}", flush=True)
        return
    print(
        f"  cancel burst {r.cell.name}: before {r.rate(r.before):.0f} rps, after {r.rate(r.after):.0f} rps "
        f"({r.share:.1%}); burst {r.first_chunk}/{CANCEL_BURST} got a first chunk in {r.burst_s:.2f} s, "
        f"upstream cut {r.upstream_cut}, finished {r.upstream_done}",
        flush=True,
    )


def render_cancel(results: list[CancelResult], warmup: float, settle: float) -> list[str]:
    """The report section: rates before and after the burst per contender, and the target lines."""
    if not results:
        return []
    r0 = results[0]
    lines = [
        "",
        f"## Cancel burst: {r0.cell.label}, slow upstream",
        "",
        f"Per contender (the gateway with a user of its own): {warmup:g} s warm-up, the steady rate over "
        f"{r0.window_s:g} s (wrk, {r0.cell.connections} connections), then a burst of {CANCEL_BURST} concurrent "
        f"streaming requests that disconnect after the first chunk, a {settle:g} s pause, and the steady rate over "
        f'{r0.window_s:g} s again. Steady RPS as above (connections / mean latency x good share). "Upstream cut" '
        "counts burst streams the fake upstream did not finish (the cancel reached it).",
        "",
        "| Contender | Before steady RPS | After steady RPS | After / before | Burst: first chunk seen "
        "| Upstream cut / finished | Errors before / after |",
        "|---|---|---|---|---|---|---|",
    ]
    by = {r.contender: r for r in results}
    ordered = [by[n] for n in CANCEL_CONTENDERS if n in by]
    for r in ordered:
        if r.error:
            lines.append(f"| {r.contender} | failed: {r.error[:80]} |")
            continue
        errors = [sum(raw[k] for k in ("bad_status", "bad_body", "timeout")) for raw in (r.before, r.after)]
        lines.append(
            f"| {r.contender} | {r.rate(r.before):,.0f} | {r.rate(r.after):,.0f} | {r.share:.1%} "
            f"| {r.first_chunk} / {CANCEL_BURST} | {r.upstream_cut} / {r.upstream_done} "
            f"| {errors[0]} / {errors[1]} |"
        )
    lines.append("")
    for r in ordered:
        flag = "PASS" if not r.error and r.share >= TARGET_CANCEL else "FAIL"
        share = "not measured" if r.error else f"{r.share:.1%}"
        lines.append(f"- {r.contender}: after cancel burst ≥ {TARGET_CANCEL * 100:.0f} % of before ({share}): {flag}")
    return lines
