"""The usage-event outbox in SQLite: claims with a lease, sync states, summaries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from gateway.store.base import PendingEvent, UsageSummaryRow
from gateway.store.sqlite_base import SqliteBase
from gateway.timeutil import iso, parse_iso, utcnow


class SqliteOutbox(SqliteBase):
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

    async def release_claims(self, keep_owner: str) -> int:
        """Hand back claims of stopped processes now instead of after their lease."""
        async with self._lock:
            cur = await self.db.execute(
                "UPDATE usage_events SET state = 'pending', claimed_by = NULL, claimed_until = NULL"
                " WHERE state = 'claimed' AND claimed_by != ?",
                (keep_owner,),
            )
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
