"""PostgreSQL store (asyncpg, pooled): for several gateway processes on one database.

Returns exactly what `SqliteStore` returns (the same dataclasses, aware UTC datetimes, the same
order); tests/test_store.py runs one contract suite on both. Keys, requests and limits here; the
rest in the `postgres_*.py` modules it is assembled from (outbox, leases, rate windows, dashboard,
refusals).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from gateway.store.postgres_base import affected, refused
from gateway.store.postgres_dashboard import PostgresDashboard
from gateway.store.postgres_leases import PostgresLeases
from gateway.store.postgres_outbox import PostgresOutbox
from gateway.store.postgres_ratelimit import PostgresRateWindows
from gateway.store.postgres_refusals import PostgresRefusals
from gateway.timeutil import utcnow

__all__ = ["PostgresStore"]

_KEY_COLS = "id, user_id, name, prefix, created_at, revoked_at"

# A batch goes in as one statement whatever its size: a column array per field, unnested to rows.
_INSERT_REQUESTS = (
    "INSERT INTO requests (id, user_id, key_id, provider, model, operation, stream, started_at, outcome,"
    " reservation, owner, finished_at, status_code, usage, usage_raw, estimated, sync_state)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::boolean[],"
    " $8::timestamptz[], $9::text[], $10::jsonb[], $11::text[], $12::timestamptz[], $13::integer[], $14::jsonb[],"
    " $15::json[], $16::boolean[], $17::text[])"
    " ON CONFLICT (id) DO NOTHING"  # replays (journal recovery) are dropped; a bad row still fails the batch
)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(id=row[0], user_id=row[1], name=row[2], prefix=row[3], created_at=row[4], revoked_at=row[5])


class PostgresStore(PostgresLeases, PostgresRateWindows, PostgresOutbox, PostgresDashboard, PostgresRefusals):
    """Implements `gateway.store.base.Store`."""

    # ------------------------------------------------------------------ keys
    async def create_key(self, key_id: str, user_id: str, name: str, prefix: str, key_hash: bytes) -> ApiKey:
        now = utcnow()
        await self.pool.execute(
            "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            key_id,
            user_id,
            name,
            prefix,
            key_hash,
            now,
        )
        return ApiKey(id=key_id, user_id=user_id, name=name, prefix=prefix, created_at=now)

    async def list_keys(self, user_id: str | None = None) -> list[ApiKey]:
        if user_id is None:
            rows = await self.pool.fetch(f"SELECT {_KEY_COLS} FROM api_keys ORDER BY created_at, id")
        else:
            rows = await self.pool.fetch(
                f"SELECT {_KEY_COLS} FROM api_keys WHERE user_id = $1 ORDER BY created_at, id", user_id
            )
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        status = await self.pool.execute(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL", utcnow(), key_id
        )
        return affected(status) > 0

    async def find_key(self, key_hash: bytes) -> tuple[ApiKey, bytes] | None:
        row = await self.pool.fetchrow(f"SELECT {_KEY_COLS}, key_hash FROM api_keys WHERE key_hash = $1", key_hash)
        return None if row is None else (_key(row), bytes(row[6]))

    # ------------------------------------------------------------------ requests and usage
    async def finish_request(self, record: RequestRecord) -> None:
        await self.finish_requests([record])

    async def finish_requests(self, records: Sequence[RequestRecord]) -> None:
        if not records:
            return
        with rejecting(refused):
            now = utcnow()
            columns: list[list[Any]] = [[] for _ in range(17)]
            for r in records:
                row = (
                    r.id,
                    r.user_id,
                    r.key_id,
                    r.provider,
                    r.model,
                    r.operation,
                    r.stream,
                    r.started_at,
                    r.outcome,
                    _json(r.reservation),
                    r.owner,
                    r.finished_at or now,
                    r.status_code,
                    _json(r.usage),
                    None if r.usage_raw is None else _json(r.usage_raw),
                    r.estimated,
                    "pending" if event_count(r.usage) else "none",  # events to send, or none
                )
                for column, value in zip(columns, row, strict=True):
                    column.append(value)
            await self.pool.execute(_INSERT_REQUESTS, *columns)

    async def finished_ids(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        rows = await self.pool.fetch("SELECT id FROM requests WHERE id = ANY($1::text[])", list(ids))
        return {r[0] for r in rows}

    async def consumed(self, user_id: str, start: datetime, end: datetime) -> dict[str, int]:
        # A request's `usage` holds what its events carry (one per non-zero meter; images one each).
        rows = await self.pool.fetch(
            "SELECT u.key, SUM(u.value::bigint) FROM requests AS r"
            " CROSS JOIN LATERAL jsonb_each_text(r.usage) AS u(key, value)"
            " WHERE r.user_id = $1 AND r.started_at >= $2 AND r.started_at < $3 AND u.value::bigint > 0"
            " GROUP BY u.key",
            user_id,
            start,
            end,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def events_for_request(self, request_id: str) -> list[UsageEvent]:
        row = await self.pool.fetchrow(
            "SELECT user_id, model, provider, started_at, usage FROM requests WHERE id = $1", request_id
        )
        if row is None:
            return []
        user_id, model, provider, started_at, usage = row
        return [
            UsageEvent(xid, request_id, user_id, meter, value, model, provider, started_at)
            for xid, meter, value in event_quantities(request_id, orjson.loads(usage))
        ]

    # ------------------------------------------------------------------ limits and webhooks
    async def get_limits(self, user_id: str) -> CustomerLimits | None:
        r = await self.pool.fetchrow(
            "SELECT user_id, meters, period_start, period_end, snapshot_at, updated_at, active, source"
            " FROM customer_limits WHERE user_id = $1",
            user_id,
        )
        if r is None:
            return None
        return CustomerLimits(
            user_id=r[0],
            meters=meters_from_doc(orjson.loads(r[1])),
            period_start=r[2],
            period_end=r[3],
            snapshot_at=r[4],
            updated_at=r[5],
            active=r[6],
            source=SnapshotSource(r[7]),
        )

    async def put_limits(self, limits: CustomerLimits) -> bool:
        meters = meters_doc(limits.meters)
        status = await self.pool.execute(
            "INSERT INTO customer_limits (user_id, meters, period_start, period_end, snapshot_at, updated_at, active,"
            " source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (user_id) DO UPDATE SET"
            " meters = excluded.meters, period_start = excluded.period_start, period_end = excluded.period_end,"
            " snapshot_at = excluded.snapshot_at, updated_at = excluded.updated_at, active = excluded.active,"
            " source = excluded.source WHERE excluded.snapshot_at >= customer_limits.snapshot_at",
            limits.user_id,
            _json(meters),
            limits.period_start,
            limits.period_end,
            limits.snapshot_at,
            limits.updated_at,
            limits.active,
            str(limits.source),
        )
        return affected(status) > 0

    async def stale_limit_users(self, older_than: datetime, limit: int) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT user_id FROM customer_limits WHERE updated_at < $1 ORDER BY updated_at, user_id LIMIT $2",
            older_than,
            limit,
        )
        return [r[0] for r in rows]

    async def known_users(self) -> list[str]:
        rows = await self.pool.fetch("SELECT DISTINCT user_id FROM api_keys ORDER BY user_id")
        return [r[0] for r in rows]

    async def record_webhook(self, webhook_id: str, event_type: str) -> bool:
        status = await self.pool.execute(
            "INSERT INTO webhook_deliveries (webhook_id, event_type, processed_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (webhook_id) DO NOTHING",
            webhook_id,
            event_type,
            utcnow(),
        )
        return affected(status) > 0

    async def forget_webhook(self, webhook_id: str) -> None:
        await self.pool.execute("DELETE FROM webhook_deliveries WHERE webhook_id = $1", webhook_id)

    async def prune_webhooks(self, older_than: datetime, limit: int) -> int:
        # A row another replica deletes first is skipped (READ COMMITTED re-checks it): no error, no wait.
        status = await self.pool.execute(
            "DELETE FROM webhook_deliveries WHERE webhook_id IN (SELECT webhook_id FROM webhook_deliveries"
            " WHERE processed_at < $1 ORDER BY processed_at LIMIT $2)",
            older_than,
            limit,
        )
        return affected(status)
