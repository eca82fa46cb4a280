"""SQLite store (aiosqlite, WAL): the embedded default. Its SQL lives here and in `sqlite_outbox.py`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from gateway.store.base import ApiKey, CustomerLimits, MeterLimit, RequestRecord, UsageEvent
from gateway.store.sqlite_base import Op, json_text, migrations_dir, opt_datetime
from gateway.store.sqlite_outbox import SqliteOutbox
from gateway.timeutil import iso, parse_iso, utcnow

__all__ = ["SqliteStore", "migrations_dir"]

_INSERT_IN_FLIGHT = (
    "INSERT INTO in_flight (id, user_id, key_id, provider, model, operation, stream, started_at, reservation, owner)"
    " VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_FINISH_REQUEST = (
    "INSERT INTO requests (id, user_id, key_id, provider, model, operation, stream, started_at, outcome,"
    " reservation, owner, finished_at, status_code, usage, usage_raw, estimated)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING"
)
_DELETE_IN_FLIGHT = "DELETE FROM in_flight WHERE id = ?"
_INSERT_EVENT = (
    "INSERT INTO usage_events (external_id, request_id, user_id, meter, value, model, provider, ts)"
    " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(external_id) DO NOTHING"  # replays dedup; bad rows still fail
)


class SqliteStore(SqliteOutbox):
    """Implements `gateway.store.base.Store`."""

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
    async def begin_request(self, record: RequestRecord) -> None:
        await self._submit(
            [
                (
                    _INSERT_IN_FLIGHT,
                    (
                        record.id,
                        record.user_id,
                        record.key_id,
                        record.provider,
                        record.model,
                        record.operation,
                        int(record.stream),
                        iso(record.started_at),
                        json_text(record.reservation),
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
                    json_text(record.reservation),
                    record.owner,
                    iso(record.finished_at or utcnow()),
                    record.status_code,
                    json_text(record.usage),
                    None if record.usage_raw is None else json_text(record.usage_raw),
                    int(record.estimated),
                ),
                False,
            ),
            (_DELETE_IN_FLIGHT, (record.id,), False),
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
            finished_at=opt_datetime(row[8]),
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
            # the in-flight columns, padded to the shape of a request row
            "SELECT id, user_id, key_id, provider, model, operation, stream, started_at, NULL, NULL, 'in_flight',"
            " reservation, '{}', NULL, 0, owner FROM in_flight ORDER BY started_at"
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
            " WHERE external_id > ? AND external_id < ? ORDER BY external_id",  # the primary key's range
            (request_id + ":", request_id + ";"),
        )
        return [self._event(r) for r in rows]

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
            period_start=opt_datetime(r[2]),
            period_end=opt_datetime(r[3]),
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
                    json_text(meters),
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
