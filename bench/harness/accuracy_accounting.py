"""Accuracy bench: settling (records, Polar sync, ledger) and the accounting of served vs billed tokens."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg
import httpx

from gateway.events import event_quantities

from .accuracy_fakes import FIXTURE_USAGE, PLAN, TAG_RE, TOKEN_METERS, Attempt, BenchPolar, BenchUpstream


# ---------------------------------------------------------------------------------------------- settling
class Db(Protocol):
    """The gateway's database as the harness reads it (SQLite file or PostgreSQL database)."""

    nudge_sql: str  # sets next_attempt_at to "due now" on pending rows, RETURNING id

    def query(self, sql: str) -> list[tuple[Any, ...]]: ...


class SqliteDb:
    nudge_sql = (
        "UPDATE requests SET next_attempt_at = '' WHERE sync_state = 'pending' AND next_attempt_at != '' RETURNING id"
    )

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            rows = conn.execute(sql).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()


class PostgresDb:
    """Each query on a connection of its own, in an event loop of its own: call it from a thread."""

    nudge_sql = (
        "UPDATE requests SET next_attempt_at = '-infinity' WHERE sync_state = 'pending'"
        " AND next_attempt_at != '-infinity' RETURNING id"
    )

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.url, timeout=10)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(run())


def local_events(db: Db) -> list[tuple[str, str, str, str, int, str]]:
    """(external_id, request_id, user_id, meter, value, sync state) of every stored event: the
    store keeps one row per request and derives its events, as the sync does."""
    rows = db.query("SELECT id, user_id, usage, sync_state FROM requests WHERE sync_state != 'none'")
    return [
        (xid, rid, user, meter, value, state)
        for rid, user, usage, state in rows
        for xid, meter, value in event_quantities(rid, json.loads(usage))
    ]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_synced(db: Db, polar: BenchPolar, timeout: float) -> int:
    """Poll until every local event is synced and in Polar; returns how many backoffs were cut short.

    Events that failed while Polar was down back off 30 s x 2^attempts (with jitter); instead of waiting
    minutes, each poll sets `next_attempt_at = ''` on pending rows, as if that time had passed."""
    nudged = 0

    def done() -> bool:
        nonlocal nudged
        rows = db.query(db.nudge_sql)
        nudged += len(rows)
        events = local_events(db)
        left = sum(1 for e in events if e[5] != "synced")
        local = {e[0] for e in events}
        with polar._lock:
            delivered = set(polar.events)
        return left == 0 and local <= delivered

    wait_until(done, timeout, "every usage event to reach Polar", interval=0.5)
    return nudged


def ledger_snapshot(url: str, keys: dict[str, str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The gateway's in-memory ledger per user (billing status): consumed and reserved per meter."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    with httpx.Client(base_url=url, timeout=10) as http:
        for user, key in keys.items():
            resp = http.get("/api/billing/status", headers={"authorization": f"Bearer {key}"})
            resp.raise_for_status()
            out[user] = {m["name"]: m for m in resp.json()["meters"]}
    return out


# ---------------------------------------------------------------------------------------------- accounting
@dataclass
class Record:
    id: str
    provider: str
    outcome: str
    estimated: bool


@dataclass
class Accounting:
    """Every figure of the report, computed from the upstream's attempts, the database and Polar."""

    served_all: Counter[str] = field(default_factory=Counter)  # per meter, every response served whole
    served_to_estimated: Counter[str] = field(default_factory=Counter)  # ... to requests settled by estimate
    local_exact: Counter[str] = field(default_factory=Counter)
    local_estimated: Counter[str] = field(default_factory=Counter)
    polar: Counter[str] = field(default_factory=Counter)
    lost_tokens: int = 0  # served, missing from the request's exact events
    extra_tokens: int = 0  # in exact events, beyond what was served
    served_without_record: int = 0
    attempts_without_record: int = 0
    records_billed_without_attempt: int = 0  # exact records with usage the upstream never got
    local_duplicates: int = 0  # a (request, meter) with two token events
    not_in_polar: int = 0
    phantom_in_polar: int = 0  # Polar events no local event has
    polar_value_mismatch: int = 0
    resends_deduplicated: int = 0
    ingests_refused: int = 0
    unsynced: int = 0
    attempts: int = 0  # requests the upstream received
    attempts_served: int = 0  # ... and answered to the last byte
    client_resends: int = 0  # tags the upstream received more than once
    untagged_records: int = 0
    outcomes: Counter[tuple[str, str, bool]] = field(default_factory=Counter)  # (provider, outcome, estimated)
    overshoot: dict[str, tuple[int, str]] = field(default_factory=dict)  # meter -> (max consumed-credited, user)
    leaked_reservations: dict[tuple[str, str], int] = field(default_factory=dict)
    ledger_drift: dict[tuple[str, str], int] = field(default_factory=dict)
    unknown_fixtures: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.not_in_polar + self.lost_tokens + self.served_without_record

    @property
    def duplicated(self) -> int:
        return (
            self.local_duplicates
            + self.phantom_in_polar
            + self.records_billed_without_attempt
            + self.extra_tokens
            + self.polar_value_mismatch
        )


def account(
    db: Db,
    upstream: BenchUpstream,
    polar: BenchPolar,
    users: list[str],
    ledgers: list[dict[str, dict[str, dict[str, Any]]]],
) -> Accounting:
    """`ledgers`: each replica's billing status per user (reservations summed over them; each one's
    `consumed` must equal the events)."""
    """Pair each upstream attempt with the gateway's record of it (per tag, in order) and compare usage."""
    acc = Accounting()
    recs_by_tag: dict[str, list[Record]] = defaultdict(list)
    for rid, provider, model, outcome, estimated in db.query(
        "SELECT id, provider, model, outcome, estimated FROM requests ORDER BY started_at, id"
    ):
        m = TAG_RE.search(model)
        if m is None:
            acc.untagged_records += 1
            continue
        recs_by_tag[m.group(0)].append(Record(rid, provider, outcome, bool(estimated)))
        acc.outcomes[(provider, outcome, bool(estimated))] += 1
    attempts_by_tag: dict[str, list[Attempt]] = defaultdict(list)
    for att in upstream.attempts:
        attempts_by_tag[att.tag].append(att)
        if att.fixture not in FIXTURE_USAGE and att.fixture not in acc.unknown_fixtures:
            acc.unknown_fixtures.append(att.fixture)
    acc.client_resends = sum(len(a) - 1 for a in attempts_by_tag.values())
    acc.attempts = len(upstream.attempts)
    acc.attempts_served = sum(1 for a in upstream.attempts if a.served)

    usage_by_request: dict[str, Counter[str]] = defaultdict(Counter)
    rows_per_request_meter: Counter[tuple[str, str]] = Counter()
    local_values: dict[str, int] = {}
    consumed: dict[str, Counter[str]] = defaultdict(Counter)
    events = local_events(db)
    for xid, rid, user, meter, value, _state in events:
        usage_by_request[rid][meter] += value
        rows_per_request_meter[(rid, meter)] += 1
        local_values[xid] = value
        consumed[user][meter] += value
    acc.local_duplicates = sum(1 for (_r, m), c in rows_per_request_meter.items() if m in TOKEN_METERS and c > 1)

    for tag in sorted(set(recs_by_tag) | set(attempts_by_tag)):
        recs, atts = recs_by_tag.get(tag, []), attempts_by_tag.get(tag, [])
        for i in range(max(len(recs), len(atts))):
            rec = recs[i] if i < len(recs) else None
            attempt = atts[i] if i < len(atts) else None
            served = FIXTURE_USAGE.get(attempt.fixture, {}) if attempt is not None and attempt.served else {}
            acc.served_all.update(served)
            if rec is None:
                acc.attempts_without_record += 1
                acc.served_without_record += 1 if served else 0
                acc.lost_tokens += sum(served.values())
                continue
            got = usage_by_request[rec.id]
            if rec.estimated:
                acc.served_to_estimated.update(served)
                acc.local_estimated.update(got)
                continue
            acc.local_exact.update(got)
            if attempt is None and got:
                acc.records_billed_without_attempt += 1
            for meter in TOKEN_METERS:
                acc.lost_tokens += max(0, served.get(meter, 0) - got[meter])
                acc.extra_tokens += max(0, got[meter] - served.get(meter, 0))

    with polar._lock:
        polar_events = dict(polar.events)
        sent = sum(polar.sent.values())
    for xid, ev in polar_events.items():
        acc.polar[ev["name"]] += int(ev["metadata"]["value"])
        if xid not in local_values:
            acc.phantom_in_polar += 1
        elif int(ev["metadata"]["value"]) != local_values[xid]:
            acc.polar_value_mismatch += 1
    acc.not_in_polar = sum(1 for x in local_values if x not in polar_events)
    acc.resends_deduplicated = polar.duplicates_accepted
    acc.ingests_refused = sent - len(polar_events) - polar.duplicates_accepted
    acc.unsynced = sum(1 for e in events if e[5] != "synced")

    for meter, credited in PLAN.items():
        worst = max(users, key=lambda u: consumed[u][meter])
        acc.overshoot[meter] = (consumed[worst][meter] - credited, worst)
    for ledger in ledgers:
        for user, meters in ledger.items():
            for meter, st in meters.items():
                if st["reserved"]:
                    held = acc.leaked_reservations.get((user, meter), 0)
                    acc.leaked_reservations[(user, meter)] = held + int(st["reserved"])
                if st["consumed"] != consumed[user][meter]:
                    acc.ledger_drift.setdefault((user, meter), int(st["consumed"]) - consumed[user][meter])
    return acc


def failures_of(acc: Accounting) -> list[str]:
    failures = []
    if acc.lost:
        failures.append("lost usage")
    if acc.duplicated:
        failures.append("double-counted usage")
    if any(v > 0 for v, _u in acc.overshoot.values()):
        failures.append("quota overshoot")
    if acc.unsynced:
        failures.append("events not synced")
    if acc.unknown_fixtures or acc.untagged_records or acc.attempts_without_record:
        failures.append("unexplained requests (see notes)")
    return failures
