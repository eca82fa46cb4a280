"""Refusals per hour in SQLite (see `refusals_base`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from gateway.store.dashboard_base import Step
from gateway.store.refusals_base import RefusalCount, hour_start
from gateway.store.sqlite_base import SqliteBase
from gateway.timeutil import iso, parse_iso

_ADD = (
    "INSERT INTO refusals (hour, status, reason, count) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (hour, status, reason) DO UPDATE SET count = count + excluded.count"
)
# The bucket's start as a prefix of the stored ISO text, and what completes it to a timestamp.
_PREFIX = {Step.HOUR: (13, ":00:00Z"), Step.DAY: (10, "T00:00:00Z")}


class SqliteRefusals(SqliteBase):
    """Implements `gateway.store.refusals_base.RefusalStore`."""

    async def add_refusals(self, counts: Sequence[RefusalCount]) -> None:
        if counts:
            rows = [(iso(c.start), c.status, c.reason, c.count) for c in counts]
            await self._commit([(_ADD, rows, True)])

    async def refusals(self, since: datetime, step: Step) -> list[RefusalCount]:
        width, rest = _PREFIX[step]
        rows = await self.db.execute_fetchall(
            f"SELECT substr(hour, 1, {width}) AS b, status, reason, SUM(count) FROM refusals"
            " WHERE hour >= ? GROUP BY b, status, reason ORDER BY b, status, reason",
            (iso(hour_start(since)),),
        )
        return [RefusalCount(parse_iso(r[0] + rest), int(r[1]), r[2], int(r[3])) for r in rows]
