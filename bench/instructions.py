"""Instructions per request, counted by valgrind (callgrind): the gateway against bare-raw.

    python bench/instructions.py [--cell anthropic_json@16] [--duration 30] [--top 30]
    python bench/instructions.py --cell all --top 0 --out bench/instructions.md   # every @16 cell, a table
    python bench/instructions.py --contenders gateway,gateway-pg,gateway-w2 --memory-limiter   # shared mode

Wall-clock and CPU-time figures on this shared VM move 10-40 % between runs, so a change worth
10 us per request cannot be told from noise by `run.py`. Instruction counts do not depend on what
else the machine is doing: the same code driven the same way counts the same within ~1 %. Each
contender runs under `valgrind --tool=callgrind` (about 50x slower; every thread is counted,
the SQLite writer included) behind the same nginx upstream and wrk script as `run.py`; after a
warm-up the counters are zeroed, wrk runs, and the counters are dumped and divided by the
requests served. It prints instructions per request for each contender, their ratio (the
instruction-count analogue of `run.py`'s CPU ratio), and the C functions with the most own
instructions in the gateway (SQLite, orjson, the interpreter loop, ...).

Any gateway variant of `run.py` can be measured (`--contenders gateway,gateway-pg,gateway-w2`): a
PostgreSQL contender counts the gateway process only (the database's backends are not under
valgrind), and `--workers 2` counts every process of the tree (valgrind follows the spawned workers).
`--memory-limiter` keeps rate limits in each process's memory (see harness/site) to see
shared mode's other costs alone. Work done on timers (the lease keeper's polls, heartbeats) runs at
its wall-clock rate while valgrind serves ~50x fewer requests, so its share per request shows ~50x
too large here: `--idle S` counts the contender idle for S seconds and prints that rate apart.

Needs valgrind (Debian's package). Not a substitute for `run.py`: instructions are not cycles
(cache misses and syscalls' kernel time are not counted), but a change that removes work shows here.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.contenders import Contender, start_bare, start_gateway
from harness.fixtures import Cell, fast_cells
from harness.load import run_wrk
from harness.processes import ensure_tools, process_tree, workdir
from harness.report import git_rev
from harness.settings import GATEWAYS, LOAD_CPU
from harness.upstream import Nginx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", default="anthropic_json@16", help="a cell name, or 'all' (every cell at 16 connections)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load under valgrind")
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--linger", type=float, default=2.0, help="the gateway's record linger under valgrind")
    ap.add_argument("--contenders", default="bare-raw,gateway", help=f"of bare-raw, {', '.join(GATEWAYS)}")
    ap.add_argument("--memory-limiter", action="store_true", help="rate limits in each process's memory, shared or not")
    ap.add_argument("--idle", type=float, default=0.0, help="also count S seconds idle: timer work per second")
    ap.add_argument("--out", type=Path, help="also write a markdown table of instructions per request here")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (callgrind dumps for kcachegrind)")
    args = ap.parse_args()
    by_name = {c.name: c for c in fast_cells()}
    if args.cell == "all":
        cells = [c for c in fast_cells() if c.connections == 16]
    elif args.cell in by_name:
        cells = [by_name[args.cell]]
    else:
        sys.exit(f"unknown cell {args.cell!r}; one of: all, {', '.join(by_name)}")
    ensure_tools()
    if not _which("valgrind"):
        sys.exit("valgrind not found: apt-get install -y valgrind")
    table: dict[str, dict[str, float]] = {}
    for cell in cells:
        print(f"== {cell.name}", flush=True)
        table[cell.name] = run_cell(cell, args)
    if args.out:
        args.out.write_text(render(table, args))
        print(f"wrote {args.out}")
    return 0


def run_cell(cell: Cell, args: argparse.Namespace) -> dict[str, float]:
    counts: dict[str, float] = {}
    functions: dict[str, collections.Counter[str]] = {}
    with workdir(keep=args.keep) as work:
        upstream = Nginx("upstream", work, slow=False, cpu=LOAD_CPU, access_log=False)
        try:
            for name in args.contenders.split(","):
                out = work / f"callgrind.{name}"
                workers = GATEWAYS[name][1] if name in GATEWAYS else 1
                wrap = [
                    # valgrind runs ~50x slower: a 20 ms linger would commit ~1 request per batch, where
                    # under real load a batch holds ~70. Scale it so the store's cost per request is the real one.
                    "env",
                    f"GATEWAY_RECORD_LINGER_SECONDS={args.linger}",
                    "valgrind",
                    "--tool=callgrind",
                    # (the spawned workers of --workers N too, each in a file of its own)
                    *(["--trace-children=yes", f"--callgrind-out-file={out}.%p"] if workers > 1 else []),
                    *([] if workers > 1 else [f"--callgrind-out-file={out}"]),
                    "--dump-instr=no",
                    "--compress-strings=no",
                ]
                contender = (
                    start_gateway(upstream, work, [cell], wrap=wrap, name=name, memory_limiter=args.memory_limiter)
                    if name in GATEWAYS
                    else start_bare(name.removeprefix("bare-"), upstream, work, wrap=wrap)
                )
                try:
                    ir, requests, dumps = measure(contender, cell, args, work, out)
                    if args.idle:
                        idle = count_idle(contender, args.idle, work, out)
                        print(f"{name:>10}: {idle:12,.0f} instructions/second idle (timers: keeper, heartbeats, ...)")
                finally:
                    assert contender.proc is not None
                    contender.proc.stop(timeout=120)
                counts[name] = ir / requests
                functions[name] = sum((own_instructions(d, requests) for d in dumps), collections.Counter())
                print(f"{name:>10}: {ir / requests:12,.0f} instructions/request ({requests} requests)", flush=True)
                if args.top:
                    print_top("C functions by own instructions per request", functions[name], args.top)
        finally:
            upstream.stop()
    if "gateway" in counts and "bare-raw" in counts:
        print(f"gateway / bare-raw: {counts['gateway'] / counts['bare-raw']:.2f}x instructions per request")
        extra = functions["gateway"].copy()
        extra.subtract(functions["bare-raw"])
        print_top("where the gateway's extra instructions go (gateway - bare-raw, per request)", extra, args.top or 30)
    return counts


def render(table: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [
        "# Instructions per request (callgrind)",
        "",
        f"`python bench/instructions.py --cell {args.cell}` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"commit {git_rev()}. {args.duration:g} s of wrk load per contender under valgrind after {args.warmup:g} s "
        "of warm-up; every thread counted (the SQLite writer too); the gateway's record linger scaled to "
        f"{args.linger:g} s so its batches hold what they hold at full speed. Instructions are not cycles: cache "
        "misses and the kernel's share (syscalls) are not in these counts; `run.py` measures those.",
        "",
        "| Cell | bare-raw | gateway | gateway / bare-raw | throughput ratio this implies |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, counts in table.items():
        bare, gw = counts.get("bare-raw"), counts.get("gateway")
        if bare and gw:
            lines.append(f"| {name} | {bare:,.0f} | {gw:,.0f} | {gw / bare:.2f}x | {bare / gw:.2f}x |")
    return "\n".join(lines) + "\n"


def measure(
    contender: Contender, cell: Cell, args: argparse.Namespace, work: Path, out: Path
) -> tuple[int, int, list[Path]]:
    """Instructions of the contender's processes while wrk ran, requests served, the dumps."""
    expect = work / "expect.bin"
    expect.write_bytes(cell.fixture.served(False))
    run_wrk(contender, cell, args.warmup, expect, work)
    control(contender, "-z")
    result = run_wrk(contender, cell, args.duration, expect, work)
    ir, dumps = dump_totals(contender, work, out)
    done, good = int(result["requests"]), int(result["ok"])
    if not done or good != done:
        raise RuntimeError(f"bad responses under valgrind: {result}")
    return ir, done, dumps


def count_idle(contender: Contender, seconds: float, work: Path, out: Path) -> float:
    """Instructions per second of the contender with no load (what its timers cost)."""
    time.sleep(1.0)  # the last requests' records reach the store first
    control(contender, "-z")
    start = time.monotonic()
    time.sleep(seconds)
    ir, _ = dump_totals(contender, work, out)
    return ir / (time.monotonic() - start)


def dump_totals(contender: Contender, work: Path, out: Path) -> tuple[int, list[Path]]:
    """Dump every process of the contender; the sum of their totals and the new dump files."""
    before = set(work.glob(f"{out.name}*"))
    control(contender, "-d")
    dumps = sorted(set(work.glob(f"{out.name}*")) - before)
    if not dumps:
        raise RuntimeError("callgrind wrote no dump")
    ir = 0
    for dump in dumps:
        totals = re.search(r"^(?:totals|summary): (\d+)", dump.read_text(errors="replace"), re.M)
        if not totals:
            raise RuntimeError(f"no totals in {dump}")
        ir += int(totals.group(1))
    return ir, dumps


def control(contender: Contender, flag: str) -> None:
    for pid in process_tree(contender.pid):  # (--workers N: the supervisor and each worker)
        subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True, timeout=120)


def own_instructions(dump: Path, requests: int) -> collections.Counter[str]:
    """Own instructions per request of each C function, read from the dump (callgrind_annotate
    3.19 folds them all into the interpreter loop for this file)."""
    own: collections.Counter[str] = collections.Counter()
    fn, obj, skip = "", "", False
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("fn="):
            name = line[3:].split("'")[0]  # recursion levels ("'2") folded into one
            fn = f"{name} [{obj.rsplit('/', 1)[-1]}]"
        elif line.startswith("ob="):
            obj = line[3:]
        elif line.startswith("calls="):
            skip = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if skip:
                skip = False
            elif fn:
                parts = line.split()
                if len(parts) >= 2:
                    own[fn] += int(parts[1])
    return collections.Counter({k: v // requests for k, v in own.items()})


def print_top(title: str, counts: collections.Counter[str], top: int) -> None:
    total = sum(counts.values())
    print(f"  {title} ({total:,} in all):")
    for name, n in sorted(counts.items(), key=lambda kv: -abs(kv[1]))[:top]:
        print(f"  {n:10,}  {name[:100]}")


def _which(tool: str) -> bool:
    return subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
