"""Refusals per hour in PostgreSQL (see `refusals_base`); the same rows as `sqlite_refusals.py`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from gateway.store.dashboard_base import Step
from gateway.store.postgres_base import PostgresBase
from gateway.store.refusals_base import RefusalCount, hour_start

# One statement (atomic by itself): a column array per field, unnested to rows.
_ADD = (
    "INSERT INTO refusals (hour, status, reason, count)"
    " SELECT * FROM unnest($1::timestamptz[], $2::integer[], $3::text[], $4::bigint[])"
    " ON CONFLICT (hour, status, reason) DO UPDATE SET count = refusals.count + excluded.count"
)


class PostgresRefusals(PostgresBase):
    """Implements `gateway.store.refusals_base.RefusalStore`."""

    async def add_refusals(self, counts: Sequence[RefusalCount]) -> None:
        if counts:
            await self.pool.execute(
                _ADD,
                [c.start for c in counts],
                [c.status for c in counts],
                [c.reason for c in counts],
                [c.count for c in counts],
            )

    async def refusals(self, since: datetime, step: Step) -> list[RefusalCount]:
        unit = "hour" if step is Step.HOUR else "day"  # (the session's time zone is UTC)
        rows = await self.pool.fetch(
            f"SELECT date_trunc('{unit}', hour) AS b, status, reason, SUM(count) FROM refusals"
            ' WHERE hour >= $1 GROUP BY b, status, reason ORDER BY b, status, reason COLLATE "C"',
            hour_start(since),
        )
        return [RefusalCount(r[0], r[1], r[2], int(r[3])) for r in rows]
