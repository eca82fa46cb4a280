"""The Polar outbox in PostgreSQL: the `requests` rows with usage, claimed with a lease.

Same semantics as `sqlite_outbox.py`. Claims take rows `FOR UPDATE SKIP LOCKED`, so replicas
claiming at once get disjoint requests without waiting on each other; a claim whose lease ran out
(its process stopped) is taken over by the next claimer. A claim's end is set and compared on the
server's clock (`now()`), and so is a retry's due time: replicas on other machines agree on them
even when their clocks do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from gateway.events import event_count
from gateway.modifiers import FIELDS as MODIFIER_FIELDS
from gateway.store.base import PendingEvent, SyncBacklog, UsageSummaryRow, pending_events
from gateway.store.postgres_base import PostgresBase, affected
from gateway.store.schema import COUNT_METERS_SQL
from gateway.timeutil import utcnow

_COLS = ("id", "user_id", "model", "provider", "started_at", "usage", "attempts")
# The pricing modifiers: each raw usage field when it is a JSON string, else NULL (fixed names, not input).
_MODIFIER_COL = "CASE json_typeof({t}usage_raw -> '{f}') WHEN 'string' THEN {t}usage_raw ->> '{f}' END"


def _outbox_cols(t: str = "") -> str:
    """The outbox row of a request; `t` is its table's alias and a dot."""
    return ", ".join([*(t + c for c in _COLS), *(_MODIFIER_COL.format(t=t, f=f) for f in MODIFIER_FIELDS)])


_OUTBOX_COLS = _outbox_cols()

# {due}: now(), or 'infinity' to take those waiting out a backoff too
_CLAIM = (
    "WITH picked AS (SELECT id FROM requests"
    "   WHERE (sync_state = 'pending' AND next_attempt_at <= {due})"
    "      OR (sync_state = 'claimed' AND claimed_until < now())"
    "   LIMIT $3 FOR UPDATE SKIP LOCKED)"
    " UPDATE requests AS r SET sync_state = 'claimed', claimed_by = $1,"
    " claimed_until = now() + make_interval(secs => $2)"
    " FROM picked WHERE r.id = picked.id"
    f" RETURNING {_outbox_cols('r.')}"
)
_CLAIM_DUE = _CLAIM.format(due="now()")
_CLAIM_ANY = _CLAIM.format(due="'infinity'")


class PostgresOutbox(PostgresBase):
    async def claim_events(
        self, owner: str, limit: int, lease_seconds: float, *, due_only: bool = True
    ) -> list[PendingEvent]:
        # not due_only: a person asked for a sync now, so nothing waits out its backoff
        sql = _CLAIM_DUE if due_only else _CLAIM_ANY
        rows = await self.pool.fetch(sql, owner, float(lease_seconds), limit)
        events = pending_events(rows)
        events.sort(key=lambda e: (e.timestamp, e.external_id))
        return events

    async def mark_synced(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            await self.pool.execute(
                "UPDATE requests SET sync_state = 'synced', synced_at = $1, claimed_by = NULL, claimed_until = NULL,"
                " last_error = NULL WHERE id = ANY($2::text[]) AND sync_state != 'synced'",
                utcnow(),
                list(request_ids),
            )

    async def mark_retry(self, request_ids: Sequence[str], error: str, retry_in: float, max_attempts: int) -> None:
        if request_ids:
            await self.pool.execute(
                "UPDATE requests SET attempts = attempts + 1,"
                " sync_state = CASE WHEN attempts + 1 >= $1 THEN 'failed' ELSE 'pending' END,"
                " next_attempt_at = now() + make_interval(secs => $2), last_error = $3,"
                " claimed_by = NULL, claimed_until = NULL"
                " WHERE id = ANY($4::text[]) AND sync_state IN ('pending', 'claimed', 'failed')",
                max_attempts,
                float(retry_in),
                error[:500],
                list(request_ids),
            )

    async def mark_deferred(self, request_ids: Sequence[str], error: str) -> None:
        """An outage held these claimed requests back: pending again, no attempt counted."""
        if request_ids:
            await self.pool.execute(
                "UPDATE requests SET sync_state = 'pending', last_error = $1, claimed_by = NULL, claimed_until = NULL"
                " WHERE id = ANY($2::text[]) AND sync_state = 'claimed'",
                error[:500],
                list(request_ids),
            )

    async def requeue_failed(self, user_id: str | None = None) -> int:
        sql = (
            "UPDATE requests SET sync_state = 'pending', attempts = 0, next_attempt_at = '-infinity'"
            " WHERE sync_state = 'failed'"
        )
        args: tuple[Any, ...] = ()
        if user_id is not None:
            sql += " AND user_id = $1"
            args = (user_id,)
        rows = await self.pool.fetch(sql + " RETURNING usage", *args)
        return sum(event_count(orjson.loads(r[0])) for r in rows)

    async def release_claims(self, keep_owner: str) -> int:
        """Hand back claims of stopped processes now instead of after their lease."""
        status = await self.pool.execute(
            "UPDATE requests SET sync_state = 'pending', claimed_by = NULL, claimed_until = NULL"
            " WHERE sync_state = 'claimed' AND claimed_by != $1",
            keep_owner,
        )
        return affected(status)

    async def release_owner_claims(self, owner: str) -> int:
        """Hand back the claims of one stopped process (another one shares the database)."""
        status = await self.pool.execute(
            "UPDATE requests SET sync_state = 'pending', claimed_by = NULL, claimed_until = NULL"
            " WHERE sync_state = 'claimed' AND claimed_by = $1",
            owner,
        )
        return affected(status)

    async def usage_summary(self, user_id: str | None = None) -> list[UsageSummaryRow]:
        """Totals and event counts by sync state, per user and meter (an image is one event each)."""
        where, args = ("AND r.user_id = $1", (user_id,)) if user_id else ("", ())
        n = f"(CASE WHEN u.key IN ({COUNT_METERS_SQL}) THEN u.value::bigint ELSE 1 END)"
        rows = await self.pool.fetch(
            f"SELECT r.user_id, u.key, SUM(u.value::bigint),"
            f" SUM(CASE WHEN r.sync_state = 'synced' THEN {n} ELSE 0 END),"
            f" SUM(CASE WHEN r.sync_state IN ('pending', 'claimed') THEN {n} ELSE 0 END),"
            f" SUM(CASE WHEN r.sync_state = 'failed' THEN {n} ELSE 0 END)"
            " FROM requests AS r CROSS JOIN LATERAL jsonb_each_text(r.usage) AS u(key, value)"
            f" WHERE r.sync_state != 'none' AND u.value::bigint > 0 {where}"
            ' GROUP BY r.user_id, u.key ORDER BY r.user_id, u.key COLLATE "C"',
            *args,
        )
        return [UsageSummaryRow(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows]

    async def failed_events(self, limit: int = 100) -> list[tuple[PendingEvent, str]]:
        rows = await self.pool.fetch(
            f"SELECT {_OUTBOX_COLS}, last_error FROM requests WHERE sync_state = 'failed'"
            " ORDER BY started_at, id LIMIT $1",
            limit,
        )
        out: list[tuple[PendingEvent, str]] = []
        for row in rows:
            out.extend((e, row[-1] or "") for e in pending_events([tuple(row)[:-1]]))
        return out[:limit]

    async def sync_backlog(self) -> SyncBacklog:
        rows = await self.pool.fetch(
            "SELECT sync_state, COUNT(*), MIN(started_at) FROM requests"
            " WHERE sync_state IN ('pending', 'claimed', 'failed') GROUP BY sync_state"
        )
        by_state = {r[0]: (int(r[1]), r[2]) for r in rows}
        unsynced = [by_state[s] for s in ("pending", "claimed") if s in by_state]
        return SyncBacklog(
            pending=sum(n for n, _ in unsynced),
            failed=by_state.get("failed", (0, None))[0],
            oldest_pending_at=min((o for _, o in unsynced), default=None),
        )
