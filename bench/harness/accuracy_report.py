"""Accuracy bench: the markdown report."""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import UTC, datetime

from .accuracy_accounting import Accounting, failures_of
from .accuracy_drive import Planned, Timeline
from .accuracy_fakes import PLAN, TOKEN_METERS


# ---------------------------------------------------------------------------------------------- report
def _n(n: int) -> str:
    return f"{n:,}"


def scenario_single(tl: Timeline) -> str:
    return (
        f"Polar answered 503 from request {tl.polar_down_at} to {tl.polar_up_at}, then failed 3 ingests with"
        f" 500 and 2 with 429. At request {tl.kill_at} the gateway was killed (SIGKILL) with"
        f" {tl.streams_in_flight_at_kill} upstream streams in flight and restarted on the same port and"
        f" database ({tl.restart_seconds:.1f} s)."
    )


def scenario_multi(tl: Timeline) -> str:
    downs = ", ".join(str(i) for i, what in tl.flaps if what == "down")
    ups = ", ".join(str(i) for i, what in tl.flaps if what == "up")
    return (
        f"{tl.replicas} replicas (`gateway serve` processes, each with its own port and journal) on one"
        " PostgreSQL database, rate limits in Redis; requests go round-robin over them, as a load balancer"
        f" would send them. Polar flapped: down at requests {downs}, back at {ups}, then failed 3 ingests"
        f" with 500 and 2 with 429. At request {tl.kill_at} replica {tl.killed_replica} was killed (SIGKILL)"
        f" with {tl.streams_in_flight_at_kill} of its streams in flight; its share went to the others until"
        f" it was restarted on the same port and journal ({tl.restart_seconds:.1f} s)."
    )


def render(
    args: argparse.Namespace, plan: list[Planned], heavy: list[str], tl: Timeline, acc: Accounting, nudged: int
) -> list[str]:
    results = Counter(p.result.split(":")[0] for p in plan)
    cut = Counter(p.provider for p in plan if p.result == "cut")
    disconnected: Counter[str] = Counter()
    for (prov, outcome, _e), c in acc.outcomes.items():
        if outcome == "client_disconnected":
            disconnected[prov] += c
    conn_at_kill = sum(1 for p in plan if p.result == "connection" and p.phase == "before_kill")
    conn_after = sum(1 for p in plan if p.result == "connection" and p.phase == "after_restart")
    conn_after_killed = sum(
        1 for p in plan if p.result == "connection" and p.phase == "after_restart" and p.replica == tl.killed_replica
    )
    other = sum(c for k, c in results.items() if k not in ("ok", "cut", "402", "429", "connection"))
    blocked = {p.user for p in plan if p.result == "402"}
    by_outcome: Counter[str] = Counter()
    for (_p, o, e), c in acc.outcomes.items():
        by_outcome[f"{o}{' (estimated)' if e else ''}"] += c
    failures = failures_of(acc)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    multi = f" --multi {tl.replicas}" if tl.replicas > 1 else ""
    lines = [
        "# Accuracy benchmark" + (f": {tl.replicas} replicas" if multi else ""),
        "",
        f"`python bench/accuracy.py --users {args.users} --requests {args.requests} --seed {args.seed}{multi}`"
        f" ({args.concurrency} concurrent) — {when}, {tl.drive_seconds:.1f} s of traffic.",
        "",
        f"{args.users} users ({len(heavy)} heavy ones send half of the requests), official SDKs (anthropic"
        " AsyncAnthropic, google-genai aio; no client retries), JSON and streams, both providers. Plan for"
        " every user: "
        + ", ".join(f"`{k}` = {v}" for k, v in PLAN.items())
        + " (other meters unlimited). "
        + (scenario_multi(tl) if multi else scenario_single(tl)),
        "",
        "## Requests",
        "",
        "| | count |",
        "|---|---:|",
        f"| completed (200) | {results['ok']} |",
        f"| streams cut by the client after the first chunk (anthropic / gemini) | {cut['anthropic']} /"
        f" {cut['gemini']} |",
        f"| ... recorded by the gateway as client_disconnected (anthropic / gemini) | {disconnected['anthropic']} /"
        f" {disconnected['gemini']} |",
        f"| refused 402 (quota); users blocked | {results['402']}; {len(blocked)} |",
        f"| refused 429 | {results['429']} |",
        f"| failed: connection error, in flight at the kill | {conn_at_kill} |",
        f"| failed: connection error after the restart | {conn_after} |"
        if tl.replicas == 1
        else f"| failed: connection error after the kill (sent to the killed replica / to others) |"
        f" {conn_after_killed} / {conn_after - conn_after_killed} |",
        f"| failed: other | {other} |",
        f"| upstream: requests received / responses written to the end | {acc.attempts} / {acc.attempts_served} |",
        "| gateway records by outcome | " + ", ".join(f"{k}: {v}" for k, v in sorted(by_outcome.items())) + " |",
        "",
        "## Tokens per meter",
        "",
        "| meter | served by upstream | ... to crash-settled requests | ... to exactly recorded requests |"
        " local events, exact | local events, estimated | received by Polar (dedup) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in TOKEN_METERS:
        lines.append(
            f"| `{m}` | {_n(acc.served_all[m])} | {_n(acc.served_to_estimated[m])} |"
            f" {_n(acc.served_all[m] - acc.served_to_estimated[m])} | {_n(acc.local_exact[m])} |"
            f" {_n(acc.local_estimated[m])} | {_n(acc.polar[m])} |"
        )
    est = sum(c for (_p, _o, e), c in acc.outcomes.items() if e)
    lines += [
        "",
        "Exact means: *to exactly recorded requests* = *local events, exact*, and *exact + estimated* ="
        " *received by Polar*. A request the kill left in flight is billed its reservation, marked estimated,"
        " whether or not the upstream had finished it; that is the price of a crash, reported, not hidden.",
        "",
        "## Checks",
        "",
        "| check | value | target |",
        "|---|---:|---:|",
        f"| **lost**: local events not in Polar | {acc.not_in_polar} | 0 |",
        f"| **lost**: tokens served but missing from the request's exact events | {acc.lost_tokens} | 0 |",
        f"| **lost**: responses served with no gateway record | {acc.served_without_record} | 0 |",
        f"| **double**: tokens in exact events beyond what was served | {acc.extra_tokens} | 0 |",
        f"| **double**: exact records billed without an upstream request | {acc.records_billed_without_attempt} | 0 |",
        f"| **double**: local (request, meter) with two events | {acc.local_duplicates} | 0 |",
        f"| **double**: Polar events with no local event / with another value | {acc.phantom_in_polar} /"
        f" {acc.polar_value_mismatch} | 0 / 0 |",
        f"| resends deduplicated by Polar (allowed) | {acc.resends_deduplicated} | - |",
        f"| ingest attempts refused while Polar was down or failing | {acc.ingests_refused} | - |",
        f"| events not synced at the end | {acc.unsynced} | 0 |",
    ]
    for m, (value, user) in acc.overshoot.items():
        lines.append(f"| **overshoot** `{m}`: max consumed - credited (user {user}) | {value} | ≤ 0 |")
    lines += [
        f"| estimated records (crash-settled, or drain expired) | {est} | - |",
        f"| ledger: reservations still held, nothing in flight | {sum(acc.leaked_reservations.values())} | 0 |",
        f"| ledger: in-memory consumed ≠ local events (user, meter pairs) | {len(acc.ledger_drift)} | 0 |",
        f"| client resends seen by the upstream | {acc.client_resends} | - |",
        f"| pending backoffs cut short at the end (`next_attempt_at = ''`) | {nudged} | - |",
        "",
        f"**Result: {'PASS' if not failures else 'FAIL: ' + ', '.join(failures)}** (lost, double-counted,"
        " overshoot, unsynced)",
    ]
    if acc.leaked_reservations or acc.ledger_drift:
        lines += [
            "",
            "**Ledger: FAIL** (not part of the exit status): with nothing in flight the gateway still holds"
            " reservations and its in-memory `consumed` trails the events; see the notes. Over-blocks (402 early),"
            " never over-serves.",
        ]
    notes = []
    for user in sorted({u for u, _m in [*acc.leaked_reservations, *acc.ledger_drift]}):
        held = ", ".join(f"{m} {v}" for (u, m), v in sorted(acc.leaked_reservations.items()) if u == user)
        drift = ", ".join(f"{m} {v:+}" for (u, m), v in sorted(acc.ledger_drift.items()) if u == user)
        notes.append(
            f"- {user}: reserved with nothing in flight: {held or '-'}; in-memory consumed vs events: {drift or '-'}"
        )
    notes += [f"- client error: {r}" for r in sorted({p.result for p in plan if p.result.startswith("other")})]
    notes += [f"- unexpected upstream reply: {f}" for f in acc.unknown_fixtures]
    if acc.untagged_records:
        notes.append(f"- {acc.untagged_records} gateway record(s) without a bench tag")
    if acc.attempts_without_record:
        notes.append(f"- {acc.attempts_without_record} upstream request(s) without a gateway record")
    if tl.unreleased_connections:
        notes.append(
            f"- aiohttp warned {tl.unreleased_connections} time(s) about an unclosed connection: google-genai does"
            " not close a stream's response when the consumer stops early (cut streams); harmless here"
        )
    if notes:
        lines += ["", "Notes:", "", *notes]
    return lines
