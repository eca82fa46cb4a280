"""The Polar outbox in SQLite: `requests` rows with usage, claimed with a lease, expanded to events.

The unit is a request (migration 0004): its events are derived from its `usage` when claimed,
and its sync state moves as one. Polar dedups by external id, so resending a request whose
events were partly accepted before costs nothing but a `duplicates` count.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import orjson

from gateway.events import event_count
from gateway.modifiers import FIELDS as MODIFIER_FIELDS
from gateway.store.base import PendingEvent, SyncBacklog, UsageSummaryRow, pending_events
from gateway.store.schema import COUNT_METERS_SQL
from gateway.store.sqlite_base import SqliteBase
from gateway.timeutil import iso, parse_iso, utcnow

# The pricing modifiers: each raw usage field when it is a JSON string, else NULL (fixed names, not input).
_MODIFIER_COLS = ", ".join(
    f"CASE json_type(usage_raw, '$.{f}') WHEN 'text' THEN json_extract(usage_raw, '$.{f}') END" for f in MODIFIER_FIELDS
)
_OUTBOX_COLS = f"id, user_id, model, provider, started_at, usage, attempts, {_MODIFIER_COLS}"

# The IN term repeats the partial index's condition word for word, so SQLite uses it (covering).
BACKLOG_SQL = (
    "SELECT sync_state, COUNT(*), MIN(started_at) FROM requests"
    " WHERE sync_state IN ('pending', 'claimed', 'failed') GROUP BY sync_state"
)

# The claim searches the same index: the first IN term is its condition word for word (without
# it SQLite scans the whole table: it does not take `sync_state = 'pending'` to imply the index's
# condition), the second keeps the search to the two states a claim takes (not the failed ones).
CLAIM_SQL = (
    "UPDATE requests SET sync_state = 'claimed', claimed_by = ?, claimed_until = ?"
    " WHERE id IN (SELECT id FROM requests"
    "   WHERE sync_state IN ('pending', 'claimed', 'failed') AND sync_state IN ('pending', 'claimed')"
    "     AND ((sync_state = 'pending' AND next_attempt_at <= ?) OR (sync_state = 'claimed' AND claimed_until < ?))"
    "   LIMIT ?)"
    f" RETURNING {_OUTBOX_COLS}"
)


class SqliteOutbox(SqliteBase):
    async def claim_events(
        self, owner: str, limit: int, lease_seconds: float, *, due_only: bool = True
    ) -> list[PendingEvent]:
        now = utcnow()
        until = iso(now + timedelta(seconds=lease_seconds))
        # not due_only: a person asked for a sync now, so nothing waits out its backoff
        due = iso(now) if due_only else "9999"
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")  # claim across processes on the same file
            try:
                rows = await self.db.execute_fetchall(CLAIM_SQL, (owner, until, due, iso(now), limit))
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        events = pending_events(rows, parse_iso)
        events.sort(key=lambda e: (e.timestamp, e.external_id))
        return events

    async def mark_synced(self, request_ids: Sequence[str]) -> None:
        now = iso(utcnow())
        await self._update_many(
            "UPDATE requests SET sync_state = 'synced', synced_at = ?, claimed_by = NULL, claimed_until = NULL,"
            " last_error = NULL WHERE id = ? AND sync_state != 'synced'",
            [(now, x) for x in request_ids],
        )

    async def mark_retry(self, request_ids: Sequence[str], error: str, retry_in: float, max_attempts: int) -> None:
        due = iso(utcnow() + timedelta(seconds=retry_in))
        await self._update_many(
            "UPDATE requests SET attempts = attempts + 1,"
            " sync_state = CASE WHEN attempts + 1 >= ? THEN 'failed' ELSE 'pending' END,"
            " next_attempt_at = ?, last_error = ?, claimed_by = NULL, claimed_until = NULL"
            " WHERE id = ? AND sync_state IN ('pending', 'claimed', 'failed')",
            [(max_attempts, due, error[:500], x) for x in request_ids],
        )

    async def mark_deferred(self, request_ids: Sequence[str], error: str) -> None:
        await self._update_many(
            "UPDATE requests SET sync_state = 'pending', last_error = ?, claimed_by = NULL, claimed_until = NULL"
            " WHERE id = ? AND sync_state = 'claimed'",
            [(error[:500], x) for x in request_ids],
        )

    async def requeue_failed(self, user_id: str | None = None) -> int:
        sql = (
            "UPDATE requests SET sync_state = 'pending', attempts = 0, next_attempt_at = '' WHERE sync_state = 'failed'"
        )
        params: tuple[Any, ...] = ()
        if user_id is not None:
            sql += " AND user_id = ?"
            params = (user_id,)
        async with self._lock:
            rows = await self.db.execute_fetchall(sql + " RETURNING usage", params)
            return sum(event_count(orjson.loads(r[0])) for r in rows)

    async def release_claims(self, keep_owner: str) -> int:
        """Hand back claims of stopped processes now instead of after their lease."""
        async with self._lock:
            cur = await self.db.execute(
                "UPDATE requests SET sync_state = 'pending', claimed_by = NULL, claimed_until = NULL"
                " WHERE sync_state = 'claimed' AND claimed_by != ?",
                (keep_owner,),
            )
            return cur.rowcount

    async def release_owner_claims(self, owner: str) -> int:
        """Hand back the claims of one stopped process (another one shares the database)."""
        async with self._lock:
            cur = await self.db.execute(
                "UPDATE requests SET sync_state = 'pending', claimed_by = NULL, claimed_until = NULL"
                " WHERE sync_state = 'claimed' AND claimed_by = ?",
                (owner,),
            )
            return cur.rowcount

    async def usage_summary(self, user_id: str | None = None) -> list[UsageSummaryRow]:
        """Totals and event counts by sync state, per user and meter (an image is one event each)."""
        where, params = ("AND r.user_id = ?", (user_id,)) if user_id else ("", ())
        n = f"(CASE WHEN u.key IN ({COUNT_METERS_SQL}) THEN u.value ELSE 1 END)"
        rows = await self.db.execute_fetchall(
            f"SELECT r.user_id, u.key, SUM(u.value), SUM(CASE WHEN r.sync_state = 'synced' THEN {n} ELSE 0 END),"
            f" SUM(CASE WHEN r.sync_state IN ('pending', 'claimed') THEN {n} ELSE 0 END),"
            f" SUM(CASE WHEN r.sync_state = 'failed' THEN {n} ELSE 0 END)"
            " FROM requests AS r, json_each(r.usage) AS u"
            f" WHERE r.sync_state != 'none' AND u.value > 0 {where}"
            " GROUP BY r.user_id, u.key ORDER BY r.user_id, u.key",
            params,
        )
        return [UsageSummaryRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]

    async def failed_events(self, limit: int = 100) -> list[tuple[PendingEvent, str]]:
        rows = await self.db.execute_fetchall(
            f"SELECT {_OUTBOX_COLS}, last_error FROM requests WHERE sync_state = 'failed'"
            " ORDER BY started_at, id LIMIT ?",
            (limit,),
        )
        out: list[tuple[PendingEvent, str]] = []
        for row in rows:
            out.extend((e, row[-1] or "") for e in pending_events([row[:-1]], parse_iso))
        return out[:limit]

    async def sync_backlog(self) -> SyncBacklog:
        rows = await self.db.execute_fetchall(BACKLOG_SQL)
        by_state = {state: (int(n), oldest) for state, n, oldest in rows}
        unsynced = [by_state[s] for s in ("pending", "claimed") if s in by_state]
        oldest = min((o for _, o in unsynced), default=None)
        return SyncBacklog(
            pending=sum(n for n, _ in unsynced),
            failed=by_state.get("failed", (0, None))[0],
            oldest_pending_at=parse_iso(oldest) if oldest else None,
        )
