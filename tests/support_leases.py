"""Several gateway "processes" on one database, for the shared quota ledger's tests.

A process here is its own store connection (SQLite file or asyncpg pool), a `LeasedLedger` with
its own owner id and a `LeaseKeeper`. On PostgreSQL the store is the lease mixin on a pool plus
the few `Store` methods the ledger and journal recovery use, on a minimal schema and the real
lease migration, in a database of its own that is dropped at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from gateway.billing.keeper import LeaseKeeper
from gateway.billing.leases import LeasedLedger
from gateway.billing.protocols import Reservation
from gateway.journal import Journal
from gateway.recording import recover_journal
from gateway.store import create_store
from gateway.store.base import CustomerLimits, MeterLimit, RequestRecord
from gateway.store.leases_base import Invalidation
from gateway.timeutil import utcnow

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


# What the lease SQL reads of the PostgreSQL schema (the store's migration 0001 has more columns).
@dataclass
class Proc:
    owner: str
    store: Any  # SqliteStore | PostgresStore
    ledger: LeasedLedger
    keeper: LeaseKeeper
    journal: Journal | None = None
    invalidations: list[Invalidation] = field(default_factory=list)

    async def finish_unstored(self, rid: str, user_id: str, meter: str, reserved: int, used: int) -> None:
        """A request reserved, journaled to its end and settled, but not (yet) in the store: the
        process's lease still covers its usage."""
        assert self.journal is not None
        res = await self.ledger.reserve(user_id, {meter: reserved})
        assert isinstance(res, Reservation)
        r = record(rid, user_id, self.owner, {meter: reserved}, {meter: used})
        self.journal.begin(r)
        self.journal.finish(r)
        self.ledger.settle(res, {meter: used})

    async def kill(self) -> None:
        """Die without a word: no more heartbeats, nothing handed back, the journal left as it is."""
        for task in (self.keeper._task, self.keeper._settling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self.keeper._task = self.keeper._settling = None
        if self.journal is not None:
            self.journal.close()  # (segments with records not stored stay, unlocked, as after a crash)
        await self.store.close()


class Cluster:
    """One database, many processes."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.dsn = ""
        self._admin: asyncpg.Connection | None = None
        self._dbname = ""

    async def open(self) -> None:
        if self.kind == "postgres":
            self._dbname = f"gw_leases_{secrets.token_hex(4)}"
            self._admin = await asyncpg.connect(PG_ADMIN)
            await self._admin.execute(f'CREATE DATABASE "{self._dbname}"')
            self.dsn = f"postgresql://postgres@127.0.0.1:5432/{self._dbname}"
        s = await self.store()
        await s.migrate()
        await s.close()

    async def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(Exception):
                for task in (p.keeper._task, p.keeper._settling):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
                await p.store.close()
        if self._admin is not None:
            await self._admin.execute(f'DROP DATABASE IF EXISTS "{self._dbname}" WITH (FORCE)')
            await self._admin.close()

    async def store(self) -> Any:
        s = create_store(self.dsn if self.kind == "postgres" else f"sqlite:///{self.tmp / 'gateway.db'}", pool_size=4)
        await s.open()
        return s

    async def process(
        self,
        name: str,
        plan: dict[str, int],
        *,
        journal: bool = False,
        host: str | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> Proc:
        store = await self.store()
        owner = f"{name}-{secrets.token_hex(3)}"
        poll = kwargs.get("poll", 0.02)
        ledger = LeasedLedger(
            store,
            store,
            owner,
            plan,
            fraction=kwargs.get("fraction", 0.25),
            poll=poll,
            stale_seconds=kwargs.get("stale", 10.0),
            recall_wait=kwargs.get("recall_wait", 1.5),
            **({"fence_clock": kwargs["fence_clock"]} if "fence_clock" in kwargs else {}),
        )
        jdir = self.tmp / "journal" if journal else None
        j = Journal(jdir, owner) if journal else None
        if j is not None:
            j.open()
        proc = Proc(owner, store, ledger, None, j)  # type: ignore[arg-type]

        async def recover(directory: Path) -> object:
            return await recover_journal(store, directory)

        proc.keeper = LeaseKeeper(
            ledger,
            store,
            journal_dir=jdir,
            recover=recover,
            on_invalidation=proc.invalidations.append,
            poll=poll,
            heartbeat=kwargs.get("heartbeat", 0.1),
            stale=kwargs.get("stale", 10.0),
            idle=kwargs.get("idle", 30.0),
            host=host,
        )
        if start:
            await proc.keeper.start()
        self.procs.append(proc)
        return proc

    async def put_credit(self, user_id: str, meters: dict[str, int | None]) -> None:
        """Polar's limits for `user_id`: credited per meter (None: unlimited)."""
        now = utcnow()
        s = await self.store()
        try:
            limits = {m: MeterLimit(m, credited=c) for m, c in meters.items()}
            await s.put_limits(CustomerLimits(user_id, limits, None, None, snapshot_at=now, updated_at=now))
        finally:
            await s.close()

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the shared tables directly (SQL with `?` placeholders)."""
        if self.kind == "sqlite":
            s = await self.store()
            try:
                return [tuple(r) for r in await s.db.execute_fetchall(sql, params)]
            finally:
                await s.close()
        n = 0
        while "?" in sql:
            n += 1
            sql = sql.replace("?", f"${n}", 1)
        conn = await asyncpg.connect(self.dsn)
        try:
            return [tuple(r) for r in await conn.fetch(sql, *params)]
        finally:
            await conn.close()

    async def leases(self, user_id: str) -> dict[str, int]:
        """owner -> amount of the user's leases (one meter in these tests)."""
        rows = await self.query("SELECT owner, amount FROM quota_leases WHERE user_id = ? ORDER BY owner", user_id)
        return {r[0]: int(r[1]) for r in rows}


class CutOff:
    """A process's store as its keeper sees it, with a switch: while `cut`, every call waits (a
    network partition between the process and the database: nothing fails, nothing answers)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.open = asyncio.Event()
        self.open.set()

    def cut(self) -> None:
        self.open.clear()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            await self.open.wait()
            return await attr(*args, **kwargs)

        return call


class LogReads:
    """A process's store as its keeper sees it, counting the reads of the invalidation log."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def invalidations_after(self, seq: int, lookback_seconds: float) -> list[Invalidation]:
        self.count += 1
        return list(await self._store.invalidations_after(seq, lookback_seconds))


def count_log_reads(keeper: LeaseKeeper) -> LogReads:
    reads = LogReads(keeper.store)
    keeper.store = reads  # type: ignore[assignment]
    return reads


@contextlib.asynccontextmanager
async def cluster(kind: str, tmp: Path) -> AsyncIterator[Cluster]:
    c = Cluster(kind, tmp)
    await c.open()
    try:
        yield c
    finally:
        await c.close()


def record(rid: str, user_id: str, owner: str, reservation: dict[str, int], usage: dict[str, int]) -> RequestRecord:
    r = RequestRecord(
        id=rid,
        user_id=user_id,
        key_id="k1",
        provider="anthropic",
        model="claude-test",
        operation="messages",
        stream=False,
        started_at=utcnow(),
        reservation=dict(reservation),
        owner=owner,
    )
    r.usage = dict(usage)
    r.outcome = "ok"
    r.status_code = 200
    r.finished_at = utcnow()
    return r
