#!/usr/bin/env python3
"""Gateway benchmark: the gateway against a direct upstream and two bare pass-throughs.

One command (from the repository root, with the venv's python)::

    python bench/run.py [--quick] [--duration 10] [--out bench/results.md]
    python bench/run.py --slow          # slow-upstream mode, 256 connections

It starts a fake provider upstream (nginx + the echo module, serving the recorded fixtures,
streams written one event per write) and every contender, pinned to CPU 0; then, cell by cell,
drives each contender in turn with wrk pinned to CPU 1 (the upstream shares CPU 1), so that a
cell's contenders are measured seconds apart.
Contenders: ``direct`` (a second nginx, the upstream itself, pinned to CPU 0), ``bare-starlette``
and ``bare-raw`` (bench/bare.py) and ``gateway`` (``python -m gateway serve`` with real keys,
limits that are never hit, metering into SQLite). After the run it checks that the gateway's
recorded meter totals equal the requests the upstream served times the fixture's usage.

See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.cancel import CancelResult, print_cancel, run_cancel
from harness.contenders import Contender, gateway_available, start_bare, start_direct, start_gateway
from harness.fixtures import FIXTURE_LIST, Cell, fast_cells, slow_cells
from harness.load import Result, merge_rounds, print_result, run_cell
from harness.meters import MeterRow, check_meters, print_meters
from harness.processes import ensure_tools, workdir
from harness.report import render_report, update_readme
from harness.settings import (
    BARE,
    BARE_W2,
    BENCH,
    CANCEL_CONTENDERS,
    CONTENDERS,
    DEFAULT_CONTENDERS,
    GATEWAYS,
    LOAD_CPU,
    TTFB_CONTENDERS,
    TTFB_REQUESTS,
    TTFB_REQUESTS_QUICK,
    TTFB_WARMUP,
)
from harness.ttfb import TtfbResult, measure_ttfb, print_ttfb
from harness.upstream import Nginx

# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the gateway against direct and bare pass-throughs.")
    p.add_argument("--quick", action="store_true", help="1 round of 3 s per cell")
    p.add_argument("--duration", type=float, help="seconds per round (default 5, --quick 3)")
    p.add_argument(
        "--rounds", type=int, help="rounds per cell, contenders interleaved (default 3, --quick and --slow 1)"
    )
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell, not measured (default 1)")
    p.add_argument("--slow", action="store_true", help="slow-upstream mode: 250 ms JSON, 31x20 ms streams, 256 conns")
    p.add_argument("--out", type=Path, help="markdown output (default bench/results.md, --slow bench/results_slow.md)")
    p.add_argument(
        "--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"comma-separated, of {','.join(CONTENDERS)}"
    )
    p.add_argument("--cells", default="", help="comma-separated subset of cell names, e.g. anthropic_json@16")
    p.add_argument("--retries", type=int, default=1, help="measure a cell again when other load disturbed it")
    p.add_argument("--quiet-timeout", type=float, default=15, help="max seconds to wait for a quiet machine per cell")
    p.add_argument("--update-readme", action="store_true", help="paste the report into bench/README.md")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, nginx config, gateway db)")
    p.add_argument(
        "--memory-limiter",
        action="store_true",
        help="rate limits in each gateway process's memory, shared or not: shared mode's other costs alone",
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0 if args.slow else 5.0)
    args.rounds = max(1, args.rounds or (1 if args.quick or args.slow else 3))
    args.warmup = 1.0 if args.warmup is None else args.warmup
    args.settle = 1.5 if args.slow else 0.5
    args.ttfb_requests = TTFB_REQUESTS_QUICK if args.quick else TTFB_REQUESTS
    args.out = args.out or BENCH / ("results_slow.md" if args.slow else "results.md")
    args.contender_list = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(args.contender_list) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    return args


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
    ttfb: list[TtfbResult] = []
    cancel: list[CancelResult] = []
    # Side measurements on the Anthropic SSE cell: TTFB at 1 connection (fast), cancel burst (--slow).
    sse = next((c for c in cells if c.fixture.name == "anthropic_sse"), None)
    with workdir(args.keep) as tmp:
        expect = {}
        for fx in FIXTURE_LIST:
            expect[fx.name] = tmp / f"expect_{fx.name}"
            expect[fx.name].write_bytes(fx.served(args.slow))
        upstream = Nginx("upstream", tmp, args.slow, LOAD_CPU, access_log=True)
        print(f"fake upstream (nginx) on {upstream.url}, pinned to CPU {LOAD_CPU}; work dir {tmp}", flush=True)
        contenders: dict[str, Contender] = {}
        try:
            # Every contender runs from the start, idle but for its cell: each cell is measured for all
            # of them back to back, so the ratios compare runs seconds apart, not minutes.
            for name in args.contender_list:
                why = gateway_available() if name in GATEWAYS else None
                if why:
                    notes.append(f"{name} skipped: {why}")
                    print(notes[-1], flush=True)
                    continue
                try:
                    if name == "direct":
                        contenders[name] = start_direct(tmp, args.slow)
                    elif name in BARE:
                        contenders[name] = start_bare(name.removeprefix("bare-"), upstream, tmp)
                    elif name == BARE_W2:
                        contenders[name] = start_bare("raw", upstream, tmp, workers=2)
                    else:
                        extra = ("ttfb", "cancel") if name == "gateway" else ()
                        contenders[name] = start_gateway(
                            upstream, tmp, cells, extra=extra, name=name, memory_limiter=args.memory_limiter
                        )
                except RuntimeError as exc:
                    notes.append(f"{name} failed to start: {str(exc).splitlines()[0]}")
                    print(notes[-1], flush=True)
                    continue
                c = contenders[name]
                print(f"{name} on :{c.port} (pid {c.pid}, CPU {c.cpus})", flush=True)
                results[name] = []
            for cell in cells:
                # Rounds: every contender once per round, the order rotated each round; a row is the
                # median round, a ratio the median of the per-round ratios (see merge_rounds).
                rounds: dict[str, list[Result]] = {}
                for rnd in range(args.rounds):
                    names = list(contenders)
                    names = names[rnd % len(names) :] + names[: rnd % len(names)] if names else names
                    for name in names:
                        contender = contenders[name]
                        try:
                            r = run_cell(contender, cell, args, upstream, expect[cell.fixture.name], tmp)
                        except RuntimeError as exc:
                            notes.append(f"{name} failed: {str(exc).splitlines()[0]}")
                            print(notes[-1], flush=True)
                            failed = contenders.pop(name)
                            failed.stop()
                            failed.cleanup()
                            continue
                        tag = f"{name} r{rnd + 1}" if args.rounds > 1 else name
                        print(f"{tag:<15}", end="", flush=True)
                        print_result(r, args.slow)
                        rounds.setdefault(name, []).append(r)
                for name, rs in rounds.items():
                    results[name].append(merge_rounds(rs))
            for name, contender in contenders.items():
                if sse and not args.slow and name in TTFB_CONTENDERS:
                    one = Cell(sse.fixture, 1)
                    view = contender.as_user("ttfb", one)
                    body = expect[sse.fixture.name].read_bytes()
                    ttfb.append(measure_ttfb(view, one, body, args.ttfb_requests, TTFB_WARMUP, args.quiet_timeout))
                    print_ttfb(ttfb[-1])
                if sse and args.slow and name in CANCEL_CONTENDERS:
                    cancel.append(run_cancel(contender, sse, args, upstream, expect[sse.fixture.name], tmp))
                    print_cancel(cancel[-1])
        finally:
            for contender in contenders.values():
                contender.stop()
            notes_meter = []
            for name, contender in contenders.items():
                if name in GATEWAYS and name in results:
                    rows, note = check_meters(contender, results[name])
                    print_meters(rows, note)
                    meter_rows += rows
                    notes_meter += [f"{name}: {note}"] if note else []
                contender.cleanup()
            meter_note = "; ".join(notes_meter)
            upstream.stop()
        report = render_report(results, cells, args, meter_rows, meter_note, notes, ttfb, cancel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print()
    print(report)
    print(f"wrote {args.out}")
    if args.update_readme:
        update_readme(report, args.slow)
    return 1 if any(not m.ok for m in meter_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
