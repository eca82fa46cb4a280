"""Profile the gateway's hot path under load: py-spy samples it while wrk drives one cell.

    python bench/hotspots.py [--cell anthropic_json@16] [--duration 10] [--top 25] [--bare]
    python bench/hotspots.py --contender gateway-w2 --memory-limiter   # shared mode (gateway-pg too)

Prints the functions with the most samples, by own time and by inclusive time, so the
billing path's cost can be read off (the closing notes of the performance work quote it).
Uses the same nginx upstream, wrk scripts and pinning as `bench/run.py`. Also prints the
CPU time per request of each thread. `--bare` profiles the bare pass-through (bare-raw)
instead, to see what the gateway adds. `--contender` profiles another gateway variant of `run.py`
(with `--workers 2`, every worker: py-spy follows subprocesses, and the CPU per request is per
process and thread); `--memory-limiter` keeps rate limits in memory (see harness/site).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.contenders import start_bare, start_gateway
from harness.fixtures import fast_cells
from harness.load import run_wrk
from harness.processes import ensure_tools, process_tree, workdir
from harness.settings import GATEWAYS, LOAD_CPU
from harness.upstream import Nginx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", default="anthropic_json@16")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--bare", action="store_true", help="profile bare-raw instead of the gateway")
    ap.add_argument("--contender", default="gateway", choices=list(GATEWAYS), help="the gateway variant")
    ap.add_argument("--memory-limiter", action="store_true", help="rate limits in memory, shared or not")
    ap.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks here (one line per stack, its count)")
    args = ap.parse_args()
    cells = {c.name: c for c in fast_cells()}
    cell = cells[args.cell]
    ensure_tools()
    with workdir(keep=False) as work:
        upstream = Nginx("upstream", work, slow=False, cpu=LOAD_CPU, access_log=False)
        gateway = (
            start_bare("raw", upstream, work)
            if args.bare
            else start_gateway(upstream, work, [cell], name=args.contender, memory_limiter=args.memory_limiter)
        )
        try:
            expect = work / "expect.bin"
            expect.write_bytes(cell.fixture.served(False))
            run_wrk(gateway, cell, 2, expect, work)  # warm up
            raw = work / "profile.txt"
            spy = subprocess.Popen(
                [
                    py_spy(),
                    "record",
                    "--pid",
                    str(gateway.proc.pid),
                    "--duration",
                    str(int(args.duration)),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    "--gil",  # only samples holding the GIL: waiting for it (journal writes) is not work
                    *(["--subprocesses"] if GATEWAYS.get(args.contender, (0, 1))[1] > 1 and not args.bare else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            result: dict[str, int] = {}
            before = thread_cpu(gateway.proc.pid)
            t = threading.Thread(target=lambda: result.update(run_wrk(gateway, cell, args.duration, expect, work)))
            t.start()
            spy.wait()
            t.join()
            after = thread_cpu(gateway.proc.pid)
            print(f"{cell.name}: {result}")
            print_thread_cpu(before, after, result.get("requests", 0))
            report(raw, args.top)
            if args.raw:
                shutil.copy(raw, args.raw)
        finally:
            gateway.proc.stop()
            upstream.stop()
    return 0


def thread_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread of the process and its children, from /proc: unlike
    py-spy's samples, a thread waiting for the GIL costs nothing here. Python does not name OS
    threads, so an event loop's is told apart by its id (the process id) and the others by theirs."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in process_tree(root):
        where = "" if pid == root else f"process {pid}: "
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue  # the process ended
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            name = where + ("event loop (main thread)" if task.name == str(pid) else f"thread {task.name}")
            fields = stat[stat.rindex(")") + 2 :].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def print_thread_cpu(before: dict[str, float], after: dict[str, float], requests: int) -> None:
    if not requests:
        return
    print("CPU per request by thread:")
    total = 0.0
    for name in sorted(after, key=lambda n: before.get(n, 0.0) - after[n]):
        us = (after[name] - before.get(name, 0.0)) / requests * 1e6
        total += us
        if us >= 0.5:
            print(f"  {us:7.1f} us  {name}")
    print(f"  {total:7.1f} us  (all threads)")


def py_spy() -> str:
    """py-spy from the venv running this script (pip install py-spy), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        sys.exit("py-spy not found: pip install py-spy")
    return found


def report(raw: Path, top: int) -> None:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")" if " (" in f else f
            for f in stack.split(";")
        ]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"\n{total} samples. Own time:")
    for name, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nInclusive time:")
    for name, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
