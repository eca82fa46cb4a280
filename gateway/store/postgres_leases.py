"""Quota leases, the process registry and the invalidation log in PostgreSQL (see `leases_base`).

A lease is taken in a transaction holding an advisory lock on the user (takes for one user run one
at a time, across machines); the consumed sum and every lease are read in ONE statement, so they
come from one snapshot even while stores commit beside it (READ COMMITTED takes a snapshot per
statement). A stored request leaves its owner's lease through the trigger of migration 0003_leases.

Every process watches the invalidation log by LISTENing on a connection of its own: an entry's
insert NOTIFYs in the same statement (delivered when it commits), so a keeper reads the log when
told rather than on every poll.

Heartbeats and the log's entries are stamped with the server's clock (`now()`), and ages are
measured against it (`now() - make_interval(secs => ...)`): replicas on other machines share the
database, not a clock, and a host running behind must not be taken for dead while it beats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from datetime import datetime

import asyncpg

from gateway.store.leases_base import Invalidation, InvalidationWatch, LeaseGrant, LeaseTake, ProcessRow, grant
from gateway.store.postgres_base import Connection

log = logging.getLogger("gateway.store")

_LOCK_SPACE = 0x4C45  # first key of the two-key advisory lock: leases, apart from other users of locks
_EXPIRED = datetime.fromisoformat("0001-01-02T00:00:00+00:00")  # older than any staleness limit
_CHANNEL = "gateway_invalidations"
_RELISTEN_SECONDS = 1.0  # between attempts to listen again after the connection was lost
_CANNOT_LISTEN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

# Consumed, leases and (with a recall) the live owners yet to answer it, in one statement: one
# snapshot, so a hand-back committing meanwhile is seen whole (amount and answer) or not at all.
_TOTALS = (
    "SELECT 'c', u.key, SUM(u.value::bigint), 0::bigint FROM requests AS r"
    " CROSS JOIN LATERAL jsonb_each_text(r.usage) AS u(key, value)"
    " WHERE r.user_id = $1 AND r.started_at >= $2 AND r.started_at < $3 AND u.value::bigint > 0 GROUP BY u.key"
    " UNION ALL"
    " SELECT 'l', meter, SUM(amount), SUM(CASE WHEN owner = $4 THEN amount ELSE 0 END)"
    " FROM quota_leases WHERE user_id = $1 GROUP BY meter"
    " UNION ALL"
    " SELECT 'a', '', COUNT(DISTINCT l.owner), 0 FROM quota_leases AS l JOIN processes AS p ON p.owner = l.owner"
    " WHERE $5::bigint > 0 AND l.user_id = $1 AND l.owner <> $4 AND l.amount > 0 AND l.answered < $5"
    " AND p.heartbeat_at >= clock_timestamp() - make_interval(secs => $6) AND l.meter = ANY($7::text[])"
)


class ListenWatch:
    """`InvalidationWatch` by LISTEN: the mark counts notifications; None while not listening (the
    connection was lost: it listens again in the background, and the log is read meanwhile)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._heard = 0
        self._listens = 0  # a new LISTEN is a new mark: what was notified before it is read once
        self._task: asyncio.Task[None] | None = None
        self._next_try = 0.0

    async def listen(self) -> None:
        conn = await asyncpg.connect(self._dsn, connection_class=Connection)
        try:
            await conn.add_listener(_CHANNEL, self._notified)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._listens += 1

    def _notified(self, *_: object) -> None:
        self._heard += 1

    def mark(self) -> object | None:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return (self._listens, self._heard)
        if (self._task is None or self._task.done()) and time.monotonic() >= self._next_try:
            self._next_try = time.monotonic() + _RELISTEN_SECONDS
            self._task = asyncio.create_task(self._relisten(), name="invalidation-listen")
        return None

    async def _relisten(self) -> None:
        try:
            await self.listen()
        except _CANNOT_LISTEN as exc:
            log.warning("cannot listen for invalidations (%s); reading the log every poll", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await conn.close()


class PostgresLeases:
    """Implements `gateway.store.leases_base.LeaseStore`; mixed into the PostgreSQL store."""

    pool: asyncpg.Pool
    dsn: str

    async def take_lease(self, take: LeaseTake) -> LeaseGrant:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_SPACE, take.user_id)
            consumed: dict[str, int] = {}
            leased: dict[str, int] = {}
            own: dict[str, int] = {}
            unanswered = 0
            rows = await conn.fetch(
                _TOTALS,
                take.user_id,
                take.start,
                take.end,
                take.owner,
                take.recall_seq,
                float(take.stale_seconds),
                [a.meter for a in take.asks],
            )
            for kind, meter, total, mine in rows:
                if kind == "c":
                    consumed[meter] = int(total)
                elif kind == "l":
                    leased[meter], own[meter] = int(total), int(mine)
                else:
                    unanswered = int(total)
            out = grant(take, consumed, leased, own)
            out.unanswered = unanswered
            if out.granted:
                await _add(conn, take.owner, take.user_id, out.granted)
        return out

    async def return_lease(self, owner: str, user_id: str, amounts: Mapping[str, int], answered: int = 0) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if amounts:
                await conn.execute(
                    "UPDATE quota_leases AS l SET amount = l.amount - a.amount"
                    " FROM unnest($3::text[], $4::bigint[]) AS a(meter, amount)"
                    " WHERE l.owner = $1 AND l.user_id = $2 AND l.meter = a.meter",
                    owner,
                    user_id,
                    list(amounts),
                    list(amounts.values()),
                )
            if answered:
                await conn.execute(
                    "UPDATE quota_leases SET answered = $3 WHERE owner = $1 AND user_id = $2 AND answered < $3",
                    owner,
                    user_id,
                    answered,
                )

    async def cover_lease(self, owner: str, user_id: str, amounts: Mapping[str, int]) -> None:
        async with self.pool.acquire() as conn:
            await _add(conn, owner, user_id, amounts)

    async def set_leases(self, owner: str, user_id: str, amounts: Mapping[str, int]) -> None:
        await self.pool.execute(
            "INSERT INTO quota_leases (owner, user_id, meter, amount)"
            " SELECT $1, $2, a.meter, a.amount FROM unnest($3::text[], $4::bigint[]) AS a(meter, amount)"
            " ON CONFLICT (owner, user_id, meter) DO UPDATE SET amount = excluded.amount",
            owner,
            user_id,
            list(amounts),
            list(amounts.values()),
        )

    async def lease_totals(self, user_id: str) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT meter, SUM(amount) FROM quota_leases WHERE user_id = $1 GROUP BY meter", user_id
        )
        return {r[0]: int(r[1]) for r in rows}

    async def release_owner(self, owner: str, claim: object | None = None) -> int | None:
        async with self.pool.acquire() as conn, conn.transaction():
            if claim is None:
                await conn.execute("DELETE FROM processes WHERE owner = $1", owner)
            elif await conn.execute("DELETE FROM processes WHERE owner = $1 AND heartbeat_at = $2", owner, claim) == (
                "DELETE 0"
            ):
                return None  # it beat since the claim: alive
            status = await conn.execute("DELETE FROM quota_leases WHERE owner = $1", owner)
        return int(status.split()[-1])

    # ------------------------------------------------------------------ process registry
    async def register_process(self, owner: str, host: str, pid: int, journal: str) -> None:
        await self.pool.execute(
            "INSERT INTO processes (owner, host, pid, journal, started_at, heartbeat_at)"
            " VALUES ($1, $2, $3, $4, now(), now())"
            " ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            owner,
            host,
            pid,
            journal,
        )

    async def heartbeat(self, owner: str) -> bool:
        status = await self.pool.execute("UPDATE processes SET heartbeat_at = now() WHERE owner = $1", owner)
        return bool(status != "UPDATE 0")

    async def stale_processes(self, owner: str, stale_seconds: float) -> list[ProcessRow]:
        rows = await self.pool.fetch(
            "SELECT owner, host, pid, journal, heartbeat_at FROM processes"
            " WHERE heartbeat_at < now() - make_interval(secs => $1) AND owner <> $2",
            float(stale_seconds),
            owner,
        )
        return [ProcessRow(r[0], r[1], int(r[2]), r[3], r[4]) for r in rows]

    async def claim_process(self, owner: str, stale_seconds: float) -> object | None:
        stamp: object | None = await self.pool.fetchval(
            "UPDATE processes SET heartbeat_at = now()"
            " WHERE owner = $1 AND heartbeat_at < now() - make_interval(secs => $2) RETURNING heartbeat_at",
            owner,
            float(stale_seconds),
        )
        return stamp

    async def stop_process(self, owner: str, keep: bool) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if keep:
                await conn.execute("UPDATE processes SET heartbeat_at = $2 WHERE owner = $1", owner, _EXPIRED)
            else:
                await conn.execute("DELETE FROM processes WHERE owner = $1", owner)
                await conn.execute("DELETE FROM quota_leases WHERE owner = $1", owner)

    # ------------------------------------------------------------------ invalidation log
    async def notify_invalidation(self, kind: str, subject: str) -> int:
        seq = await self.pool.fetchval(
            "WITH entry AS (INSERT INTO invalidations (kind, subject, created_at) VALUES ($1, $2, now()) RETURNING seq)"
            f" SELECT seq FROM entry, pg_notify('{_CHANNEL}', '') AS notified",
            kind,
            subject,
        )
        return int(seq)

    async def watch_invalidations(self) -> InvalidationWatch:
        watch = ListenWatch(self.dsn)
        try:
            await watch.listen()
        except _CANNOT_LISTEN as exc:  # (it listens again when asked for a mark)
            log.warning("cannot listen for invalidations (%s); reading the log every poll", exc)
        return watch

    async def invalidations_after(self, seq: int, lookback_seconds: float) -> list[Invalidation]:
        rows = await self.pool.fetch(
            "SELECT seq, kind, subject FROM invalidations"
            " WHERE seq > $1 OR created_at >= now() - make_interval(secs => $2) ORDER BY seq",
            seq,
            float(lookback_seconds),
        )
        return [Invalidation(int(r[0]), r[1], r[2]) for r in rows]

    async def last_invalidation(self) -> int:
        return int(await self.pool.fetchval("SELECT COALESCE(MAX(seq), 0) FROM invalidations"))

    async def prune_invalidations(self, older_than_seconds: float) -> int:
        status = await self.pool.execute(
            "DELETE FROM invalidations WHERE created_at < now() - make_interval(secs => $1)", float(older_than_seconds)
        )
        return int(status.split()[-1])


async def _add(conn: asyncpg.Connection, owner: str, user_id: str, amounts: Mapping[str, int]) -> None:
    await conn.execute(
        "INSERT INTO quota_leases (owner, user_id, meter, amount)"
        " SELECT $1, $2, a.meter, a.amount FROM unnest($3::text[], $4::bigint[]) AS a(meter, amount)"
        " ON CONFLICT (owner, user_id, meter) DO UPDATE SET amount = quota_leases.amount + excluded.amount",
        owner,
        user_id,
        list(amounts),
        list(amounts.values()),
    )
