"""The dashboard's reads in SQLite (see `dashboard_base`)."""

from __future__ import annotations

from datetime import datetime

import orjson

from gateway.store.dashboard_base import RequestRow, Step, TrafficRow, UserRow, id_floor
from gateway.store.schema import NOT_TOKENS_SQL
from gateway.store.sqlite_base import SqliteBase, opt_datetime
from gateway.timeutil import iso, parse_iso

# The bucket's start as a prefix of the stored ISO text, and what completes it to a timestamp.
_PREFIX = {Step.HOUR: (13, ":00:00Z"), Step.DAY: (10, "T00:00:00Z")}


class SqliteDashboard(SqliteBase):
    """Implements `gateway.store.dashboard_base.DashboardReads`."""

    async def traffic(self, since: datetime, step: Step) -> list[TrafficRow]:
        width, rest = _PREFIX[step]
        rows = await self.db.execute_fetchall(
            f"SELECT substr(r.started_at, 1, {width}) AS b, r.outcome, COUNT(*),"
            " SUM((SELECT COALESCE(SUM(u.value), 0) FROM json_each(r.usage) AS u"
            f"      WHERE u.key NOT IN ({NOT_TOKENS_SQL})))"
            " FROM requests AS r WHERE r.id >= ? AND r.started_at >= ?"
            " GROUP BY b, r.outcome ORDER BY b, r.outcome",
            (id_floor(since), iso(since)),
        )
        return [TrafficRow(parse_iso(r[0] + rest), r[1], int(r[2]), int(r[3])) for r in rows]

    async def recent_requests(self, user_id: str, limit: int = 50) -> list[RequestRow]:
        rows = await self.db.execute_fetchall(
            "SELECT id, started_at, provider, model, outcome, status_code, usage, estimated, sync_state"
            " FROM requests WHERE user_id = ? ORDER BY started_at DESC, id DESC LIMIT ?",
            (user_id, limit),
        )
        return [
            RequestRow(r[0], parse_iso(r[1]), r[2], r[3], r[4], r[5], orjson.loads(r[6]), bool(r[7]), r[8])
            for r in rows
        ]

    async def search_users(self, text: str, limit: int = 50) -> list[UserRow]:
        # instr, not LIKE: case-sensitive like PostgreSQL's strpos, and no wildcards to escape
        rows = await self.db.execute_fetchall(
            "SELECT k.user_id, COUNT(*), SUM(k.revoked_at IS NULL),"
            " (SELECT MAX(r.started_at) FROM requests AS r WHERE r.user_id = k.user_id)"
            " FROM api_keys AS k WHERE instr(k.user_id, ?) > 0"
            " GROUP BY k.user_id ORDER BY k.user_id LIMIT ?",
            (text, limit),
        )
        return [UserRow(r[0], int(r[1]), int(r[2]), opt_datetime(r[3])) for r in rows]

    async def last_synced_at(self, since: datetime) -> datetime | None:
        rows = list(
            await self.db.execute_fetchall(
                "SELECT MAX(synced_at) FROM requests WHERE id >= ? AND started_at >= ? AND sync_state = 'synced'",
                (id_floor(since), iso(since)),
            )
        )
        return opt_datetime(rows[0][0])
