"""Quota leases, the process registry and the invalidation log in SQLite (see `leases_base`).

A lease is taken in one `BEGIN IMMEDIATE` transaction (one writer at a time on the file, across
processes), so the consumed sum, the other leases and the new lease are one consistent step.
A stored request leaves its owner's lease in the transaction that stores it (`SqliteStore.finish_requests`).

Every process on the file watches the invalidation log through a signal file beside the database
(`<database>-invalidations`, like its -wal and -shm): a new entry's sequence number is written there
after its insert commits, so a keeper reads the log when the file's content changed rather than
on every poll (a read through aiosqlite is a thread round trip; the file is one `pread`).

Ages (staleness, the log's look-back) are measured with this host's clock: every process on the
file runs on this host, so they share it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from datetime import timedelta

from gateway.store.leases_base import Invalidation, InvalidationWatch, LeaseGrant, LeaseTake, ProcessRow, grant
from gateway.store.sqlite_base import Op, SqliteBase
from gateway.timeutil import iso, parse_iso, utcnow

log = logging.getLogger("gateway.store")

_EXPIRED = "0001-01-02T00:00:00.000000Z"  # a heartbeat older than any staleness limit
_SIGNAL_SUFFIX = "-invalidations"


def _ago(seconds: float) -> str:
    """The instant `seconds` ago on this host's clock, as stored."""
    return iso(utcnow() - timedelta(seconds=seconds))


def _signal_path(db: str) -> str:
    # Beside the file itself, as SQLite puts its -wal: processes naming it through a symlink meet there.
    return os.path.realpath(db) + _SIGNAL_SUFFIX


class SignalFileWatch:
    """`InvalidationWatch` on the signal file: its content is the last entry notified."""

    def __init__(self, path: str) -> None:
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def mark(self) -> object | None:
        if self._fd is None:
            return None
        try:
            return os.pread(self._fd, 32, 0)
        except OSError:
            return None

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class _Blind:
    """No signal file (an in-memory database, or none could be made): always read the log."""

    def mark(self) -> object | None:
        return None

    async def close(self) -> None:
        pass


class SqliteLeases(SqliteBase):
    """Implements `gateway.store.leases_base.LeaseStore`."""

    async def take_lease(self, take: LeaseTake) -> LeaseGrant:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                rows = await self.db.execute_fetchall(
                    "SELECT u.key, SUM(u.value) FROM requests AS r, json_each(r.usage) AS u"
                    " WHERE r.user_id = ? AND r.started_at >= ? AND r.started_at < ? AND u.value > 0 GROUP BY u.key",
                    (take.user_id, iso(take.start), iso(take.end)),
                )
                consumed = {r[0]: int(r[1]) for r in rows}
                rows = await self.db.execute_fetchall(
                    "SELECT meter, SUM(amount), SUM(CASE WHEN owner = ? THEN amount ELSE 0 END)"
                    " FROM quota_leases WHERE user_id = ? GROUP BY meter",
                    (take.owner, take.user_id),
                )
                leased = {r[0]: int(r[1]) for r in rows}
                own = {r[0]: int(r[2]) for r in rows}
                out = grant(take, consumed, leased, own)
                if take.recall_seq:
                    meters = [a.meter for a in take.asks]
                    found = list(
                        await self.db.execute_fetchall(
                            "SELECT COUNT(DISTINCT l.owner) FROM quota_leases AS l JOIN processes AS p"
                            " ON p.owner = l.owner WHERE l.user_id = ? AND l.owner != ? AND l.amount > 0"
                            " AND l.answered < ? AND p.heartbeat_at >= ?"
                            f" AND l.meter IN ({','.join('?' * len(meters))})",
                            (take.user_id, take.owner, take.recall_seq, _ago(take.stale_seconds), *meters),
                        )
                    )
                    out.unanswered = int(found[0][0])
                if out.granted:
                    await self.db.executemany(
                        "INSERT INTO quota_leases (owner, user_id, meter, amount) VALUES (?,?,?,?)"
                        " ON CONFLICT(owner, user_id, meter) DO UPDATE SET amount = amount + excluded.amount",
                        [(take.owner, take.user_id, meter, amount) for meter, amount in out.granted.items()],
                    )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return out

    async def return_lease(self, owner: str, user_id: str, amounts: Mapping[str, int], answered: int = 0) -> None:
        ops: list[Op] = []
        if amounts:
            ops.append(
                (
                    "UPDATE quota_leases SET amount = amount - ? WHERE owner = ? AND user_id = ? AND meter = ?",
                    [(amount, owner, user_id, meter) for meter, amount in amounts.items()],
                    True,
                )
            )
        if answered:
            ops.append(
                (
                    "UPDATE quota_leases SET answered = ? WHERE owner = ? AND user_id = ? AND answered < ?",
                    (answered, owner, user_id, answered),
                    False,
                )
            )
        if ops:
            await self._transaction(ops)

    async def cover_lease(self, owner: str, user_id: str, amounts: Mapping[str, int]) -> None:
        await self._transaction(
            [
                (
                    "INSERT INTO quota_leases (owner, user_id, meter, amount) VALUES (?,?,?,?)"
                    " ON CONFLICT(owner, user_id, meter) DO UPDATE SET amount = amount + excluded.amount",
                    [(owner, user_id, meter, amount) for meter, amount in amounts.items()],
                    True,
                )
            ]
        )

    async def set_leases(self, owner: str, user_id: str, amounts: Mapping[str, int]) -> None:
        await self._transaction(
            [
                (
                    "INSERT INTO quota_leases (owner, user_id, meter, amount) VALUES (?,?,?,?)"
                    " ON CONFLICT(owner, user_id, meter) DO UPDATE SET amount = excluded.amount",
                    [(owner, user_id, meter, amount) for meter, amount in amounts.items()],
                    True,
                )
            ]
        )

    async def lease_totals(self, user_id: str) -> dict[str, int]:
        rows = await self.db.execute_fetchall(
            "SELECT meter, SUM(amount) FROM quota_leases WHERE user_id = ? GROUP BY meter", (user_id,)
        )
        return {r[0]: int(r[1]) for r in rows}

    async def release_owner(self, owner: str, claim: object | None = None) -> int | None:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                if claim is None:
                    await self.db.execute("DELETE FROM processes WHERE owner = ?", (owner,))
                else:
                    cur = await self.db.execute(
                        "DELETE FROM processes WHERE owner = ? AND heartbeat_at = ?", (owner, claim)
                    )
                    if cur.rowcount == 0:
                        await self.db.execute("ROLLBACK")
                        return None  # it beat since the claim: alive
                cur = await self.db.execute("DELETE FROM quota_leases WHERE owner = ?", (owner,))
                released = cur.rowcount
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return released

    # ------------------------------------------------------------------ process registry
    async def register_process(self, owner: str, host: str, pid: int, journal: str) -> None:
        now = iso(utcnow())
        await self._transaction(
            [
                (
                    "INSERT INTO processes (owner, host, pid, journal, started_at, heartbeat_at) VALUES (?,?,?,?,?,?)"
                    " ON CONFLICT(owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                    (owner, host, pid, journal, now, now),
                    False,
                )
            ]
        )

    async def heartbeat(self, owner: str) -> bool:
        async with self._lock:
            cur = await self.db.execute("UPDATE processes SET heartbeat_at = ? WHERE owner = ?", (iso(utcnow()), owner))
            return cur.rowcount > 0

    async def stale_processes(self, owner: str, stale_seconds: float) -> list[ProcessRow]:
        rows = await self.db.execute_fetchall(
            "SELECT owner, host, pid, journal, heartbeat_at FROM processes WHERE heartbeat_at < ? AND owner != ?",
            (_ago(stale_seconds), owner),
        )
        return [ProcessRow(r[0], r[1], int(r[2]), r[3], parse_iso(r[4])) for r in rows]

    async def claim_process(self, owner: str, stale_seconds: float) -> object | None:
        now = utcnow()
        stamp = iso(now)
        async with self._lock:
            cur = await self.db.execute(
                "UPDATE processes SET heartbeat_at = ? WHERE owner = ? AND heartbeat_at < ?",
                (stamp, owner, iso(now - timedelta(seconds=stale_seconds))),
            )
            return stamp if cur.rowcount > 0 else None

    async def stop_process(self, owner: str, keep: bool) -> None:
        if keep:
            ops: list[Op] = [("UPDATE processes SET heartbeat_at = ? WHERE owner = ?", (_EXPIRED, owner), False)]
        else:
            ops = [
                ("DELETE FROM processes WHERE owner = ?", (owner,), False),
                ("DELETE FROM quota_leases WHERE owner = ?", (owner,), False),
            ]
        await self._transaction(ops)

    # ------------------------------------------------------------------ invalidation log
    async def notify_invalidation(self, kind: str, subject: str) -> int:
        async with self._lock:
            rows = await self.db.execute_fetchall(
                "INSERT INTO invalidations (kind, subject, created_at) VALUES (?,?,?) RETURNING seq",
                (kind, subject, iso(utcnow())),
            )
        seq = int(next(iter(rows))[0])
        if self.path != ":memory:":  # (committed: autocommit)
            # A lost signal (a crash right here) only delays the entry to the keepers' next heartbeat.
            with contextlib.suppress(OSError):
                fd = os.open(_signal_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.pwrite(fd, b"%020d" % seq, 0)
                finally:
                    os.close(fd)
        return seq

    async def watch_invalidations(self) -> InvalidationWatch:
        if self.path == ":memory:":
            return _Blind()
        try:
            return SignalFileWatch(_signal_path(self.path))
        except OSError as exc:  # (a directory we may not write to: the log is read every poll, as before)
            log.warning("cannot watch invalidations through %s (%s)", _signal_path(self.path), exc)
            return _Blind()

    async def invalidations_after(self, seq: int, lookback_seconds: float) -> list[Invalidation]:
        rows = await self.db.execute_fetchall(
            "SELECT seq, kind, subject FROM invalidations WHERE seq > ? OR created_at >= ? ORDER BY seq",
            (seq, _ago(lookback_seconds)),
        )
        return [Invalidation(int(r[0]), r[1], r[2]) for r in rows]

    async def last_invalidation(self) -> int:
        rows = list(await self.db.execute_fetchall("SELECT COALESCE(MAX(seq), 0) FROM invalidations"))
        return int(rows[0][0])

    async def prune_invalidations(self, older_than_seconds: float) -> int:
        async with self._lock:
            cur = await self.db.execute("DELETE FROM invalidations WHERE created_at < ?", (_ago(older_than_seconds),))
            return cur.rowcount
