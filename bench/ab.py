#!/usr/bin/env python3
"""A/B of gateway variants: the same cell, rounds interleaved, CPU per request and RPS side by side.

    python bench/ab.py --variant base= --variant nojournal=env:GATEWAY_JOURNAL_DIR=/dev/shm/j \\
        --variant head=tree:../other-worktree [--cell anthropic_json@16] [--rounds 6] [--duration 5]
    python bench/ab.py --slow --cell gemini_sse@256 --variant gw= --variant bare=bare:raw   # slow upstream
    python bench/ab.py --contender gateway-w2 --memory-limiter --variant a= --variant b=tree:../other

A variant is `name=` (this checkout as it is), `name=env:K=V[,K=V]` (extra environment),
`name=tree:PATH` (the gateway package of another checkout, e.g. a `git worktree` of another
commit) or `name=bare:raw` (a bare pass-through of bench/bare.py, for scale). `bench/run.py`
answers "how far from the bare pass-through"; this answers "did this change help", where the
machine's drift (+-20 % between minutes) would swamp a before/after pair: every round runs each
variant back to back and the ratios are taken per round. Timing stays noisy here: for changes
worth a few percent, count instructions instead (`bench/pipeline.py --instructions --tree`).
Each variant gets its own database, migrated and given a key by this checkout's CLI, so a `tree:`
variant must share this checkout's schema.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.contenders import Contender, start_bare, start_gateway
from harness.fixtures import fast_cells, slow_cells
from harness.load import Result, ideal_share, run_cell
from harness.processes import ensure_tools, tree_user_system_seconds, workdir
from harness.settings import GATEWAYS
from harness.upstream import Nginx


@dataclass
class Variant:
    name: str
    wrap: list[str]
    bare: str = ""  # a bare pass-through mode (bench/bare.py) instead of the gateway


FORMS = "name=, name=env:K=V[,K=V], name=tree:PATH or name=bare:MODE"


def parse_variant(text: str) -> Variant:
    name, _, spec = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected {FORMS}")
    if not spec:
        return Variant(name, [])
    kind, _, value = spec.partition(":")
    if kind == "env" and value:
        return Variant(name, ["env", *value.split(",")])
    if kind == "bare" and value:
        return Variant(name, [], bare=value)
    if kind == "tree" and value:
        tree = Path(value).resolve()
        if not (tree / "gateway" / "__init__.py").exists():
            raise argparse.ArgumentTypeError(f"variant {name}: {tree} holds no gateway package")
        return Variant(name, ["env", "-C", str(tree)])  # `python -m` puts the working directory first
    raise argparse.ArgumentTypeError(f"variant {text!r}: expected {FORMS}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", type=parse_variant, required=True)
    ap.add_argument("--cell", help="default anthropic_json@16 (--slow: anthropic_json@256)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, help="seconds per round (default 5, --slow 10)")
    ap.add_argument("--slow", action="store_true", help="slow upstream, 256 connections (cells end in @256)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--contender", default="gateway", choices=list(GATEWAYS), help="the gateway variant of run.py")
    ap.add_argument("--memory-limiter", action="store_true", help="rate limits in memory, shared or not")
    args = ap.parse_args()
    cells = {c.name: c for c in (slow_cells() if args.slow else fast_cells())}
    args.cell = args.cell or ("anthropic_json@256" if args.slow else "anthropic_json@16")
    if args.cell not in cells:
        ap.error(f"unknown cell {args.cell}; one of {', '.join(cells)}")
    cell = cells[args.cell]
    variants: list[Variant] = args.variant
    if len({v.name for v in variants}) != len(variants):
        ap.error("variant names must differ")
    # run_cell's knobs, as bench/run.py sets them
    knobs = argparse.Namespace(slow=args.slow, retries=0, quiet_timeout=15, warmup=1.0)
    knobs.settle = 1.5 if args.slow else 0.5
    knobs.duration = args.duration or (10.0 if args.slow else 5.0)
    ensure_tools()
    with workdir(args.keep) as work:
        upstream = Nginx("upstream", work, slow=args.slow, cpu="1", access_log=False)
        expect = work / "expect"
        expect.write_bytes(cell.fixture.served(args.slow))
        started: list[tuple[Variant, Contender]] = []
        try:
            for v in variants:
                vdir = work / v.name
                vdir.mkdir()
                if v.bare:
                    started.append((v, start_bare(v.bare, upstream, vdir)))
                else:
                    gateway = start_gateway(
                        upstream, vdir, [cell], wrap=v.wrap, name=args.contender, memory_limiter=args.memory_limiter
                    )
                    started.append((v, gateway))
            results: dict[str, list[Result]] = {v.name: [] for v in variants}
            sys_share: dict[str, list[float]] = {v.name: [] for v in variants}
            for n in range(args.rounds):
                line = []
                for v, gw in started:
                    before = tree_user_system_seconds(gw.pid)
                    r = run_cell(gw, cell, knobs, upstream, expect, work)
                    after = tree_user_system_seconds(gw.pid)
                    sys_share[v.name].append((after[1] - before[1]) / max(1e-9, sum(after) - sum(before)))
                    if r.skipped or r.error_count:
                        raise SystemExit(f"{v.name}: {r.skipped or r.errors}")
                    results[v.name].append(r)
                    extra = f" {ideal_share(r):.1%} of ideal" if args.slow else ""
                    line.append(f"{v.name} {r.rps:,.0f} rps {r.cpu_us_per_request:.0f} us p50 {r.p50_ms:.1f} ms{extra}")
                print(f"round {n + 1}: " + " | ".join(line), flush=True)
        finally:
            for _, gw in started:
                gw.stop()
            upstream.stop()
    report(args.cell, variants, results, sys_share, args.slow)
    return 0


def report(
    cell: str,
    variants: list[Variant],
    results: dict[str, list[Result]],
    sys_share: dict[str, list[float]],
    slow: bool = False,
) -> None:
    base = variants[0].name
    print(f"\n{cell}: medians over {len(results[base])} rounds; ratios paired per round against {base}")
    head = f"{'variant':<14}{'RPS':>10}{'CPU us/req':>12}{'kernel':>8}{'p50 ms':>9}{'RPS ratio':>11}{'CPU ratio':>11}"
    print(head + (f"{'of ideal':>10}" if slow else ""))
    for v in variants:
        rs = results[v.name]
        rps = statistics.median(r.rps for r in rs)
        cpu = statistics.median(r.cpu_us_per_request for r in rs)
        pairs = list(zip(results[base], rs, strict=True))
        rps_ratio = statistics.median(r.rps / b.rps for b, r in pairs)
        cpu_ratio = statistics.median(r.cpu_us_per_request / b.cpu_us_per_request for b, r in pairs)
        kernel = statistics.median(sys_share[v.name])
        p50 = statistics.median(r.p50_ms for r in rs)
        row = f"{v.name:<14}{rps:>10,.0f}{cpu:>12.1f}{kernel:>8.0%}{p50:>9.2f}{rps_ratio:>11.3f}{cpu_ratio:>11.3f}"
        print(row + (f"{statistics.median(ideal_share(r) for r in rs):>10.1%}" if slow else ""))


if __name__ == "__main__":
    sys.exit(main())
