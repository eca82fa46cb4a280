"""SQLite store (aiosqlite, WAL). All SQL of the embedded default lives here.

Writes from the hot path (`begin_request`, `finish_request`) go through a group commit:
callers queue their statements and wait; one transaction commits everything queued,
so N concurrent requests cost one fsync-free WAL commit instead of N.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from gateway.store.base import (
    ApiKey,
    CustomerLimits,
    MeterLimit,
    PendingEvent,
    RequestRecord,
    UsageEvent,
    UsageSummaryRow,
)
from gateway.timeutil import iso, parse_iso, utcnow

log = logging.getLogger("gateway.store")


def migrations_dir(dialect: str) -> Path:
    """`migrations/<dialect>` of the source tree, or of the working directory (installed package)."""
    for root in (Path(__file__).resolve().parent.parent.parent, Path.cwd()):
        candidate = root / "migrations" / dialect
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"migrations/{dialect} not found next to the package or in the working directory")


Op = tuple[str, Sequence[Any] | list[Sequence[Any]], bool]  # sql, params, many

_INSERT_REQUEST = (
    "INSERT INTO requests (id, user_id, key_id, provider, model, operation, stream, started_at, outcome,"
    " reservation, owner) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)
_FINISH_REQUEST = (
    "INSERT INTO requests (id, user_id, key_id, provider, model, operation, stream, started_at, outcome,"
    " reservation, owner, finished_at, status_code, usage, usage_raw, estimated)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(id) DO UPDATE SET finished_at=excluded.finished_at, status_code=excluded.status_code,"
    " outcome=excluded.outcome, usage=excluded.usage, usage_raw=excluded.usage_raw,"
    " estimated=excluded.estimated, model=excluded.model"
)
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO usage_events (external_id, request_id, user_id, meter, value, model, provider, ts)"
    " VALUES (?,?,?,?,?,?,?,?)"
)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _opt_dt(text: str | None) -> datetime | None:
    return parse_iso(text) if text else None


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._queue: list[tuple[list[Op], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (not a power cut) without an fsync per commit.
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.execute("PRAGMA busy_timeout=10000")

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")  # serialises concurrent migrators on one file
            try:
                await self.db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                done = {row[0] for row in await self.db.execute_fetchall("SELECT version FROM schema_migrations")}
                for path in sorted(migrations_dir("sqlite").glob("*.sql")):
                    if path.stem in done:
                        continue
                    for statement in _split_sql(path.read_text()):
                        await self.db.execute(statement)
                    await self.db.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (path.stem, iso(utcnow())),
                    )
                    applied.append(path.stem)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return applied

    async def _transaction(self, ops: Iterable[Op]) -> None:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params, many in ops:
                    if many:
                        await self.db.executemany(sql, params)
                    else:
                        await self.db.execute(sql, params)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ group commit
    async def _submit(self, ops: list[Op]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((ops, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            merged: list[tuple[str, list[Any]]] = []
            for ops, _ in batch:  # merge runs of the same statement into one executemany
                for sql, params, many in ops:
                    rows: list[Any] = list(params) if many else [params]
                    if merged and merged[-1][0] == sql:
                        merged[-1][1].extend(rows)
                    else:
                        merged.append((sql, rows))
            try:
                await self._transaction([(sql, rows, True) for sql, rows in merged])
            except Exception as exc:
                log.exception("group commit of %d writes failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

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
            revoked_at=_opt_dt(row[5]),
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
    async def begin_request(self, record: RequestRecord) -> None:
        await self._submit(
            [
                (
                    _INSERT_REQUEST,
                    (
                        record.id,
                        record.user_id,
                        record.key_id,
                        record.provider,
                        record.model,
                        record.operation,
                        int(record.stream),
                        iso(record.started_at),
                        "in_flight",
                        _dumps(record.reservation),
                        record.owner,
                    ),
                    False,
                )
            ]
        )

    async def finish_request(self, record: RequestRecord, events: Sequence[UsageEvent]) -> None:
        ops: list[Op] = [
            (
                _FINISH_REQUEST,
                (
                    record.id,
                    record.user_id,
                    record.key_id,
                    record.provider,
                    record.model,
                    record.operation,
                    int(record.stream),
                    iso(record.started_at),
                    record.outcome,
                    _dumps(record.reservation),
                    record.owner,
                    iso(record.finished_at or utcnow()),
                    record.status_code,
                    _dumps(record.usage),
                    None if record.usage_raw is None else _dumps(record.usage_raw),
                    int(record.estimated),
                ),
                False,
            )
        ]
        if events:
            ops.append(
                (
                    _INSERT_EVENT,
                    [
                        (
                            e.external_id,
                            e.request_id,
                            e.user_id,
                            e.meter,
                            e.value,
                            e.model,
                            e.provider,
                            iso(e.timestamp),
                        )
                        for e in events
                    ],
                    True,
                )
            )
        await self._submit(ops)

    _REQUEST_COLS = (
        "id, user_id, key_id, provider, model, operation, stream, started_at, finished_at, status_code,"
        " outcome, reservation, usage, usage_raw, estimated, owner"
    )

    @staticmethod
    def _request(row: Any) -> RequestRecord:
        return RequestRecord(
            id=row[0],
            user_id=row[1],
            key_id=row[2],
            provider=row[3],
            model=row[4],
            operation=row[5],
            stream=bool(row[6]),
            started_at=parse_iso(row[7]),
            finished_at=_opt_dt(row[8]),
            status_code=row[9],
            outcome=row[10],
            reservation=orjson.loads(row[11]),
            usage=orjson.loads(row[12]),
            usage_raw=None if row[13] is None else orjson.loads(row[13]),
            estimated=bool(row[14]),
            owner=row[15],
        )

    async def in_flight_requests(self) -> list[RequestRecord]:
        rows = await self.db.execute_fetchall(
            f"SELECT {self._REQUEST_COLS} FROM requests WHERE outcome = 'in_flight' ORDER BY started_at"
        )
        return [self._request(r) for r in rows]

    async def get_request(self, request_id: str) -> RequestRecord | None:
        rows = list(
            await self.db.execute_fetchall(f"SELECT {self._REQUEST_COLS} FROM requests WHERE id = ?", (request_id,))
        )
        return self._request(rows[0]) if rows else None

    async def recent_requests(self, user_id: str | None, limit: int) -> list[RequestRecord]:
        where, params = ("WHERE user_id = ?", (user_id, limit)) if user_id else ("", (limit,))
        rows = await self.db.execute_fetchall(
            f"SELECT {self._REQUEST_COLS} FROM requests {where} ORDER BY started_at DESC LIMIT ?", params
        )
        return [self._request(r) for r in rows]

    async def consumed(self, user_id: str, start: datetime, end: datetime) -> dict[str, int]:
        rows = await self.db.execute_fetchall(
            "SELECT meter, SUM(value) FROM usage_events WHERE user_id = ? AND ts >= ? AND ts < ? GROUP BY meter",
            (user_id, iso(start), iso(end)),
        )
        return {r[0]: int(r[1]) for r in rows}

    @staticmethod
    def _event(row: Any) -> UsageEvent:
        return UsageEvent(
            external_id=row[0],
            request_id=row[1],
            user_id=row[2],
            meter=row[3],
            value=row[4],
            model=row[5],
            provider=row[6],
            timestamp=parse_iso(row[7]),
        )

    async def events_for_request(self, request_id: str) -> list[UsageEvent]:
        rows = await self.db.execute_fetchall(
            "SELECT external_id, request_id, user_id, meter, value, model, provider, ts FROM usage_events"
            " WHERE request_id = ? ORDER BY external_id",
            (request_id,),
        )
        return [self._event(r) for r in rows]

    # ------------------------------------------------------------------ sync outbox
    _PENDING_COLS = "external_id, user_id, meter, value, model, provider, ts, attempts"

    @staticmethod
    def _pending(row: Any) -> PendingEvent:
        return PendingEvent(
            external_id=row[0],
            user_id=row[1],
            meter=row[2],
            value=row[3],
            model=row[4],
            provider=row[5],
            timestamp=parse_iso(row[6]),
            attempts=row[7],
        )

    async def claim_events(self, owner: str, limit: int, lease_seconds: float) -> list[PendingEvent]:
        from datetime import timedelta

        now = utcnow()
        until = iso(now + timedelta(seconds=lease_seconds))
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")  # claim across processes on the same file
            try:
                rows = await self.db.execute_fetchall(
                    "UPDATE usage_events SET state = 'claimed', claimed_by = ?, claimed_until = ?"
                    " WHERE external_id IN (SELECT external_id FROM usage_events"
                    "   WHERE (state = 'pending' AND next_attempt_at <= ?) OR (state = 'claimed' AND claimed_until < ?)"
                    "   ORDER BY ts, external_id LIMIT ?)"
                    f" RETURNING {self._PENDING_COLS}",
                    (owner, until, iso(now), iso(now), limit),
                )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        events = [self._pending(r) for r in rows]
        events.sort(key=lambda e: (e.timestamp, e.external_id))
        return events

    async def _update_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            await self._transaction([(sql, list(params), True)])

    async def mark_synced(self, external_ids: Sequence[str]) -> None:
        now = iso(utcnow())
        await self._update_many(
            "UPDATE usage_events SET state = 'synced', synced_at = ?, claimed_by = NULL, claimed_until = NULL,"
            " last_error = NULL WHERE external_id = ? AND state != 'synced'",
            [(now, x) for x in external_ids],
        )

    async def mark_retry(
        self, external_ids: Sequence[str], error: str, next_attempt_at: datetime, max_attempts: int
    ) -> None:
        await self._update_many(
            "UPDATE usage_events SET attempts = attempts + 1,"
            " state = CASE WHEN attempts + 1 >= ? THEN 'failed' ELSE 'pending' END,"
            " next_attempt_at = ?, last_error = ?, claimed_by = NULL, claimed_until = NULL"
            " WHERE external_id = ? AND state != 'synced'",
            [(max_attempts, iso(next_attempt_at), error[:500], x) for x in external_ids],
        )

    async def mark_failed(self, external_ids: Sequence[str], error: str) -> None:
        await self._update_many(
            "UPDATE usage_events SET state = 'failed', attempts = attempts + 1, last_error = ?,"
            " claimed_by = NULL, claimed_until = NULL WHERE external_id = ? AND state != 'synced'",
            [(error[:500], x) for x in external_ids],
        )

    async def requeue_failed(self, user_id: str | None = None) -> int:
        sql = "UPDATE usage_events SET state = 'pending', attempts = 0, next_attempt_at = '' WHERE state = 'failed'"
        params: tuple[Any, ...] = ()
        if user_id is not None:
            sql += " AND user_id = ?"
            params = (user_id,)
        async with self._lock:
            cur = await self.db.execute(sql, params)
            return cur.rowcount

    async def usage_summary(self, user_id: str | None = None) -> list[UsageSummaryRow]:
        where, params = ("WHERE user_id = ?", (user_id,)) if user_id else ("", ())
        rows = await self.db.execute_fetchall(
            "SELECT user_id, meter, SUM(value), SUM(state = 'synced'), SUM(state IN ('pending', 'claimed')),"
            f" SUM(state = 'failed') FROM usage_events {where} GROUP BY user_id, meter ORDER BY user_id, meter",
            params,
        )
        return [UsageSummaryRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]

    async def failed_events(self, limit: int = 100) -> list[tuple[PendingEvent, str]]:
        rows = await self.db.execute_fetchall(
            f"SELECT {self._PENDING_COLS}, last_error FROM usage_events WHERE state = 'failed' ORDER BY ts LIMIT ?",
            (limit,),
        )
        return [(self._pending(r), r[8] or "") for r in rows]

    # ------------------------------------------------------------------ limits and webhooks
    async def get_limits(self, user_id: str) -> CustomerLimits | None:
        rows = list(
            await self.db.execute_fetchall(
                "SELECT user_id, meters, period_start, period_end, snapshot_at, updated_at, active"
                " FROM customer_limits WHERE user_id = ?",
                (user_id,),
            )
        )
        if not rows:
            return None
        r = rows[0]
        meters = {
            name: MeterLimit(
                meter=name,
                credited=m.get("credited"),
                consumed=m.get("consumed", 0.0),
                balance=m.get("balance"),
            )
            for name, m in orjson.loads(r[1]).items()
        }
        return CustomerLimits(
            user_id=r[0],
            meters=meters,
            period_start=_opt_dt(r[2]),
            period_end=_opt_dt(r[3]),
            snapshot_at=parse_iso(r[4]),
            updated_at=parse_iso(r[5]),
            active=bool(r[6]),
        )

    async def put_limits(self, limits: CustomerLimits) -> bool:
        meters = {
            name: {"credited": m.credited, "consumed": m.consumed, "balance": m.balance}
            for name, m in limits.meters.items()
        }
        async with self._lock:
            cur = await self.db.execute(
                "INSERT INTO customer_limits (user_id, meters, period_start, period_end, snapshot_at, updated_at,"
                " active) VALUES (?,?,?,?,?,?,?) ON CONFLICT(user_id) DO UPDATE SET meters = excluded.meters,"
                " period_start = excluded.period_start, period_end = excluded.period_end,"
                " snapshot_at = excluded.snapshot_at, updated_at = excluded.updated_at, active = excluded.active"
                " WHERE excluded.snapshot_at >= customer_limits.snapshot_at",
                (
                    limits.user_id,
                    _dumps(meters),
                    iso(limits.period_start) if limits.period_start else None,
                    iso(limits.period_end) if limits.period_end else None,
                    iso(limits.snapshot_at),
                    iso(limits.updated_at),
                    int(limits.active),
                ),
            )
            return cur.rowcount > 0

    async def stale_limit_users(self, older_than: datetime, limit: int) -> list[str]:
        rows = await self.db.execute_fetchall(
            "SELECT user_id FROM customer_limits WHERE updated_at < ? ORDER BY updated_at LIMIT ?",
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

    async def webhook_recorded(self, webhook_id: str) -> bool:
        rows = list(
            await self.db.execute_fetchall("SELECT 1 FROM webhook_deliveries WHERE webhook_id = ?", (webhook_id,))
        )
        return bool(rows)


def _split_sql(script: str) -> list[str]:
    """Statements of a migration file (our migrations keep ';' out of literals and comments)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
