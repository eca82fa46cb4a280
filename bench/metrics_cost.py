"""What the metrics cost a request, in instructions counted by callgrind (needs valgrind).

    python bench/metrics_cost.py [--requests 20000]

A request touches the metrics four times (`reservation_taken`, `forwarded`, `reservation_settled`,
`request`); the exported metrics are updated from those tallies about once a second. This drives
exactly those calls, with metrics on and with GATEWAY_METRICS=off (the hooks that do nothing), at
two sizes under callgrind, and prints the difference per request: start-up cancels out, and the
count does not depend on what else the machine is doing, unlike an A/B of `bench/ab.py` whose
rounds move by a few percent. Divide by the gateway's instructions per request
(`bench/instructions.py`) for the share of its cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.callgrind import instructions

USAGE = {"input_tokens": 12, "output_tokens": 30, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
FLUSH_EVERY = 3000  # requests between flushes: once a second at ~3,000 requests per second


def drive(n: int, on: bool) -> None:
    from gateway.metrics import NO_METRICS, Metrics

    m = Metrics() if on else NO_METRICS
    p = m.for_provider("anthropic")
    for i in range(n):
        arrived = perf_counter()
        m.reservation_taken()
        forwarded = perf_counter()
        p.forwarded(forwarded - arrived, perf_counter() - forwarded)
        m.reservation_settled(USAGE)
        p.request("messages", 200)
        if i % FLUSH_EVERY == 0:
            m.flush()


def count(n: int, on: bool) -> int:
    return instructions([sys.executable, __file__, "--drive", str(n), "--on" if on else "--off"], "metrics")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--drive", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--on", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--off", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.drive is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        drive(args.drive, args.on)
        return 0
    small = 2000
    per = {}
    for on in (True, False):
        per[on] = (count(small + args.requests, on) - count(small, on)) / args.requests
    print(f"metrics on   {per[True]:>9,.0f} instructions/request (the hooks and their flushes)")
    print(f"metrics off  {per[False]:>9,.0f} instructions/request (the loop and clock reads alone)")
    print(f"cost         {per[True] - per[False]:>9,.0f} instructions/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
