"""The dashboard's reads in PostgreSQL (see `dashboard_base`); the same rows as `sqlite_dashboard.py`."""

from __future__ import annotations

from datetime import datetime

import orjson

from gateway.store.dashboard_base import RequestRow, Step, TrafficRow, UserRow, id_floor
from gateway.store.postgres_base import PostgresBase
from gateway.store.schema import NOT_TOKENS_SQL


class PostgresDashboard(PostgresBase):
    """Implements `gateway.store.dashboard_base.DashboardReads`."""

    async def traffic(self, since: datetime, step: Step) -> list[TrafficRow]:
        unit = "hour" if step is Step.HOUR else "day"  # (the session's time zone is UTC)
        rows = await self.pool.fetch(
            f"SELECT date_trunc('{unit}', r.started_at) AS b, r.outcome, COUNT(*),"
            " SUM((SELECT COALESCE(SUM(u.value::bigint), 0) FROM jsonb_each_text(r.usage) AS u(key, value)"
            f"      WHERE u.key NOT IN ({NOT_TOKENS_SQL})))"
            " FROM requests AS r WHERE r.id >= $1 AND r.started_at >= $2"
            ' GROUP BY b, r.outcome ORDER BY b, r.outcome COLLATE "C"',
            id_floor(since),
            since,
        )
        return [TrafficRow(r[0], r[1], int(r[2]), int(r[3])) for r in rows]

    async def recent_requests(self, user_id: str, limit: int = 50) -> list[RequestRow]:
        rows = await self.pool.fetch(
            "SELECT id, started_at, provider, model, outcome, status_code, usage, estimated, sync_state"
            " FROM requests WHERE user_id = $1 ORDER BY started_at DESC, id DESC LIMIT $2",
            user_id,
            limit,
        )
        return [RequestRow(r[0], r[1], r[2], r[3], r[4], r[5], orjson.loads(r[6]), r[7], r[8]) for r in rows]

    async def search_users(self, text: str, limit: int = 50) -> list[UserRow]:
        rows = await self.pool.fetch(
            "SELECT k.user_id, COUNT(*), COUNT(*) FILTER (WHERE k.revoked_at IS NULL),"
            " (SELECT MAX(r.started_at) FROM requests AS r WHERE r.user_id = k.user_id)"
            " FROM api_keys AS k WHERE strpos(k.user_id, $1) > 0"
            " GROUP BY k.user_id ORDER BY k.user_id LIMIT $2",
            text,
            limit,
        )
        return [UserRow(r[0], int(r[1]), int(r[2]), r[3]) for r in rows]

    async def last_synced_at(self, since: datetime) -> datetime | None:
        value: datetime | None = await self.pool.fetchval(
            "SELECT MAX(synced_at) FROM requests WHERE id >= $1 AND started_at >= $2 AND sync_state = 'synced'",
            id_floor(since),
            since,
        )
        return value
