"""The meter check: the gateway's recorded totals against what the upstream served."""

from __future__ import annotations

from dataclasses import dataclass

from .contenders import Contender, gateway_cli, last_json
from .load import Result

# --- meter check ---------------------------------------------------------------------------


@dataclass
class MeterRow:
    contender: str
    cell: str
    meter: str
    served: int  # complete 200s the upstream served for this cell's key
    client_ok: int  # good responses wrk (and the preflight) saw
    expected: int
    recorded: int

    @property
    def ok(self) -> bool:
        return self.expected == self.recorded


def check_meters(contender: Contender, results: list[Result]) -> tuple[list[MeterRow], str]:
    """Run after the contender stopped (its graceful shutdown stores what was in flight)."""
    try:
        usage = last_json(gateway_cli(contender.env, "usage", "--json"))
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
            client = r.ok + r.warm_ok
            rows.append(MeterRow(contender.name, r.cell.name, meter, served, client, served * per_request, recorded))
    return rows, ""


def print_meters(rows: list[MeterRow], note: str) -> None:
    if note:
        print(f"meter check: {note}", flush=True)
        return
    bad = [m for m in rows if not m.ok]
    print(f"meter check: {len(rows) - len(bad)}/{len(rows)} meter totals match", flush=True)
    for m in bad:
        print(
            f"  MISMATCH {m.contender} {m.cell} {m.meter}: recorded {m.recorded}, expected {m.expected} "
            f"({m.served} upstream-served, {m.client_ok} client-seen)",
            flush=True,
        )
