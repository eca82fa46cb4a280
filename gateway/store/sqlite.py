"""SQLite store (aiosqlite, WAL): the embedded default. Keys, requests and limits here; the rest in the
`sqlite_*.py` modules it is assembled from (outbox, leases, rate windows, dashboard, refusals)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from gateway.events import event_count, event_quantities
from gateway.store.base import (
    ApiKey,
    CustomerLimits,
    RequestRecord,
    SnapshotSource,
    UsageEvent,
    meters_doc,
    meters_from_doc,
    rejecting,
)
from gateway.store.sqlite_base import Job, Op, json_text, opt_datetime, refused
from gateway.store.sqlite_dashboard import SqliteDashboard
from gateway.store.sqlite_leases import SqliteLeases
from gateway.store.sqlite_outbox import SqliteOutbox
from gateway.store.sqlite_ratelimit import SqliteRateWindows
from gateway.store.sqlite_refusals import SqliteRefusals
from gateway.timeutil import iso, parse_iso, utcnow

__all__ = ["SqliteStore"]

_REQUEST_COLUMNS = (
    "id, user_id, key_id, provider, model, operation, stream, started_at, outcome,"
    " reservation, owner, finished_at, status_code, usage, usage_raw, estimated, sync_state"
)
_WIDTH = _REQUEST_COLUMNS.count(",") + 1
_ROW = "(" + ",".join("?" * _WIDTH) + ")"


def _insert_requests(rows: int) -> str:
    # Replays (journal recovery) are dropped by ON CONFLICT; a bad row still fails the batch.
    values = ",".join([_ROW] * rows)
    return f"INSERT INTO requests ({_REQUEST_COLUMNS}) VALUES {values} ON CONFLICT(id) DO NOTHING"


# A batch goes in as multi-row INSERTs of these sizes (largest first), so a handful of prepared
# statements serve every batch size. Why: sqlite3 releases the GIL around each step, and with a
# step per row (executemany) the writer thread fought the busy event loop for the GIL on every
# row (a 2,000-request batch took 0.7 s); binding the batch as one JSON array and unpacking it
# with json_extract cost ~175k instructions per row against ~59k for multi-row VALUES
# (callgrind, SQLite 3.40, which re-parses the row's JSON for every column).
_CHUNKS = (256, 64, 16, 4, 1)
_INSERTS = {n: _insert_requests(n) for n in _CHUNKS}


def _chunked(flat: list[Any]) -> list[Op]:
    """The INSERTs for `flat` (rows of `_WIDTH` values, end to end)."""
    ops: list[Op] = []
    rows, done = len(flat) // _WIDTH, 0
    for size in _CHUNKS:
        while rows - done >= size:
            ops.append((_INSERTS[size], flat[done * _WIDTH : (done + size) * _WIDTH], False))
            done += size
    return ops


_SETTLE_LEASES = "UPDATE quota_leases SET amount = amount - ? WHERE owner = ? AND user_id = ? AND meter = ?"


def _store_requests(ops: list[Op], records: Sequence[RequestRecord]) -> Job:
    """The INSERTs, then the inserted rows' usage off their owners' leases, summed per owner, user
    and meter (a row with no lease matches nothing): a stored request counts once, in `requests`.
    When some rows were in the table already (a replay), the INSERTs run again with RETURNING to
    learn which were new; not always, as each returned row is a step that gives up the GIL.
    Without any lease (one process, the table empty) there is nothing to settle, so no per-row work
    but the INSERTs. The records are the recorder's by now: nothing changes them on the event loop."""

    def job(conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM quota_leases LIMIT 1").fetchone() is None:
            for sql, params, _ in ops:
                conn.execute(sql, params)
            return
        usage: dict[str, tuple[str, str, Mapping[str, int]]] = {}
        for r in records:
            if r.owner:
                usage.setdefault(r.id, (r.owner, r.user_id, r.usage))
        conn.execute("SAVEPOINT batch")
        if sum(conn.execute(sql, params).rowcount for sql, params, _ in ops) == len(records):
            conn.execute("RELEASE batch")
            new: Iterable[str] = usage
        else:
            conn.execute("ROLLBACK TO batch")
            conn.execute("RELEASE batch")
            new = [rid for sql, params, _ in ops for (rid,) in conn.execute(sql + " RETURNING id", params)]
        taken: dict[tuple[str, str, str], int] = {}
        for rid in new:
            if (row := usage.get(rid)) is None:
                continue
            owner, user_id, used = row
            for meter, amount in used.items():
                if amount > 0:
                    taken[owner, user_id, meter] = taken.get((owner, user_id, meter), 0) + amount
        if taken:
            conn.executemany(_SETTLE_LEASES, [(amount, *key) for key, amount in taken.items()])

    return job


class SqliteStore(SqliteLeases, SqliteRateWindows, SqliteOutbox, SqliteDashboard, SqliteRefusals):
    """Implements `gateway.store.base.Store` and `gateway.store.leases_base.LeaseStore`."""

    # ------------------------------------------------------------------ keys
    async def create_key(self, key_id: str, user_id: str, name: str, prefix: str, key_hash: bytes) -> ApiKey:
        now = utcnow()
        await self._transaction(
            [
                (
                    "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at) VALUES (?,?,?,?,?,?)",
                    (key_id, user_id, name, prefix, key_hash, iso(now)),
                    False,
                )
            ]
        )
        return ApiKey(id=key_id, user_id=user_id, name=name, prefix=prefix, created_at=now)

    @staticmethod
    def _key(row: Any) -> ApiKey:
        return ApiKey(
            id=row[0],
            user_id=row[1],
            name=row[2],
            prefix=row[3],
            created_at=parse_iso(row[4]),
            revoked_at=opt_datetime(row[5]),
        )

    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]:
        sql = "SELECT id, user_id, name, prefix, created_at, revoked_at FROM api_keys"
        params: tuple[Any, ...] = ()
        if user_id is not None:
            sql += " WHERE user_id = ?"
            params = (user_id,)
        rows = await self.db.execute_fetchall(sql + " ORDER BY created_at, id", params)
        return [self._key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        async with self._lock:
            cur = await self.db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (iso(utcnow()), key_id),
            )
            return cur.rowcount > 0

    async def find_key(self, key_hash: bytes) -> tuple[ApiKey, bytes] | None:
        rows = list(
            await self.db.execute_fetchall(
                "SELECT id, user_id, name, prefix, created_at, revoked_at, key_hash FROM api_keys WHERE key_hash = ?",
                (key_hash,),
            )
        )
        if not rows:
            return None
        return self._key(rows[0]), bytes(rows[0][6])

    # ------------------------------------------------------------------ requests and usage
    async def finish_request(self, record: RequestRecord) -> None:
        await self.finish_requests([record])

    async def finish_requests(self, records: Sequence[RequestRecord]) -> None:
        with rejecting(refused):
            flat: list[Any] = []
            for r in records:
                flat += (
                    r.id,
                    r.user_id,
                    r.key_id,
                    r.provider,
                    r.model,
                    r.operation,
                    int(r.stream),
                    r.started_iso or iso(r.started_at),
                    r.outcome,
                    json_text(r.reservation),
                    r.owner,
                    r.finished_iso or iso(r.finished_at or utcnow()),
                    r.status_code,
                    json_text(r.usage),
                    None if r.usage_raw is None else json_text(r.usage_raw),
                    int(r.estimated),
                    "pending" if event_count(r.usage) else "none",  # events to send, or none
                )
            await self._commit(_store_requests(_chunked(flat), records))

    async def finished_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = await self.db.execute_fetchall(
                f"SELECT id FROM requests WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update(r[0] for r in rows)
        return found

    async def consumed(self, user_id: str, start: datetime, end: datetime) -> dict[str, int]:
        # A request's `usage` holds what its events carry (one per non-zero meter; images one each).
        rows = await self.db.execute_fetchall(
            "SELECT u.key, SUM(u.value) FROM requests AS r, json_each(r.usage) AS u"
            " WHERE r.user_id = ? AND r.started_at >= ? AND r.started_at < ? AND u.value > 0 GROUP BY u.key",
            (user_id, iso(start), iso(end)),
        )
        return {r[0]: int(r[1]) for r in rows}

    async def events_for_request(self, request_id: str) -> list[UsageEvent]:
        rows = list(
            await self.db.execute_fetchall(
                "SELECT user_id, model, provider, started_at, usage FROM requests WHERE id = ?", (request_id,)
            )
        )
        if not rows:
            return []
        user_id, model, provider, started_at, usage = rows[0]
        ts = parse_iso(started_at)
        return [
            UsageEvent(xid, request_id, user_id, meter, value, model, provider, ts)
            for xid, meter, value in event_quantities(request_id, orjson.loads(usage))
        ]

    # ------------------------------------------------------------------ limits and webhooks
    async def get_limits(self, user_id: str) -> CustomerLimits | None:
        rows = list(
            await self.db.execute_fetchall(
                "SELECT user_id, meters, period_start, period_end, snapshot_at, updated_at, active, source"
                " FROM customer_limits WHERE user_id = ?",
                (user_id,),
            )
        )
        if not rows:
            return None
        r = rows[0]
        return CustomerLimits(
            user_id=r[0],
            meters=meters_from_doc(orjson.loads(r[1])),
            period_start=opt_datetime(r[2]),
            period_end=opt_datetime(r[3]),
            snapshot_at=parse_iso(r[4]),
            updated_at=parse_iso(r[5]),
            active=bool(r[6]),
            source=SnapshotSource(r[7]),
        )

    async def put_limits(self, limits: CustomerLimits) -> bool:
        meters = meters_doc(limits.meters)
        async with self._lock:
            cur = await self.db.execute(
                "INSERT INTO customer_limits (user_id, meters, period_start, period_end, snapshot_at, updated_at,"
                " active, source) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(user_id) DO UPDATE SET meters = excluded.meters,"
                " period_start = excluded.period_start, period_end = excluded.period_end,"
                " snapshot_at = excluded.snapshot_at, updated_at = excluded.updated_at, active = excluded.active,"
                " source = excluded.source WHERE excluded.snapshot_at >= customer_limits.snapshot_at",
                (
                    limits.user_id,
                    json_text(meters),
                    iso(limits.period_start) if limits.period_start else None,
                    iso(limits.period_end) if limits.period_end else None,
                    iso(limits.snapshot_at),
                    iso(limits.updated_at),
                    int(limits.active),
                    str(limits.source),
                ),
            )
            return cur.rowcount > 0

    async def stale_limit_users(self, older_than: datetime, limit: int) -> list[str]:
        rows = await self.db.execute_fetchall(
            "SELECT user_id FROM customer_limits WHERE updated_at < ? ORDER BY updated_at, user_id LIMIT ?",
            (iso(older_than), limit),
        )
        return [r[0] for r in rows]

    async def known_users(self) -> list[str]:
        rows = await self.db.execute_fetchall("SELECT DISTINCT user_id FROM api_keys ORDER BY user_id")
        return [r[0] for r in rows]

    async def record_webhook(self, webhook_id: str, event_type: str) -> bool:
        async with self._lock:
            cur = await self.db.execute(
                "INSERT OR IGNORE INTO webhook_deliveries (webhook_id, event_type, processed_at) VALUES (?,?,?)",
                (webhook_id, event_type, iso(utcnow())),
            )
            return cur.rowcount > 0

    async def forget_webhook(self, webhook_id: str) -> None:
        async with self._lock:
            await self.db.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))

    async def prune_webhooks(self, older_than: datetime, limit: int) -> int:
        async with self._lock:
            cur = await self.db.execute(
                "DELETE FROM webhook_deliveries WHERE webhook_id IN (SELECT webhook_id FROM webhook_deliveries"
                " WHERE processed_at < ? ORDER BY processed_at LIMIT ?)",
                (iso(older_than), limit),
            )
            return cur.rowcount
