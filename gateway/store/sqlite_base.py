"""SQLite connection, migrations and the writer thread: the machinery under `SqliteStore`.

Finished requests arrive already batched (`recording.Recorder` gathers them for one
transaction). That transaction runs as one call on a writer thread of its own (stdlib
sqlite3): going through aiosqlite it took one event-loop round trip per statement, and under
a burst of requests each round trip waited behind the burst (measured: +100 ms at 256
connections). Everything else uses aiosqlite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from gateway.store.schema import migration_scripts, split_sql
from gateway.timeutil import iso, parse_iso, utcnow

log = logging.getLogger("gateway.store")


Op = tuple[str, Sequence[Any] | list[Sequence[Any]], bool]  # sql, params, many
Job = Callable[[sqlite3.Connection], None]  # statements run in one transaction, on the writer thread


def json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def opt_datetime(text: str | None) -> datetime | None:
    return parse_iso(text) if text else None


_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # NORMAL in WAL mode survives a killed process (not a power cut) without an fsync per commit.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA cache_size=-16384",  # 16 MiB: keep the hot index pages in memory
    # A batch insert needs a statement journal (to undo just that statement on a constraint
    # error); on disk that was a temp file created, written and unlinked per batch.
    "PRAGMA temp_store=MEMORY",
)


# What a record's own values cause (binding a value SQLite cannot hold, a constraint): retrying
# fails again. OperationalError (locked, busy, disk I/O) and a closed store are outages.
_REFUSALS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, OverflowError, TypeError, ValueError)


def refused(exc: BaseException) -> bool:
    """Whether the store refused a write for the records' sake (see `_REFUSALS`), not for its own."""
    if isinstance(exc, sqlite3.ProgrammingError):  # also a closed database: only a value it cannot bind
        return str(exc).startswith("Error binding parameter")
    return isinstance(exc, _REFUSALS)


class SqliteBase:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._checkpointer: asyncio.Task[None] | None = None
        self._writer: sqlite3.Connection | None = None  # the writer thread's own connection
        self._writer_thread: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def open(self) -> None:
        if self.path != ":memory:":  # (an in-memory database is one connection: no writer thread)
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # The writer's connection first: a database that cannot be opened fails here, before
            # aiosqlite's thread starts (on a failed connect it is stopped without being waited for,
            # and reports to the event loop after the CLI has closed it: a traceback on exit).
            self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
            try:
                self._writer = await asyncio.get_running_loop().run_in_executor(self._writer_thread, self._open_writer)
            except BaseException:
                self._writer_thread.shutdown(wait=False)
                self._writer_thread = None
                raise
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in _PRAGMAS:
                await self._db.execute(pragma)
        except BaseException:
            await self.close()
            raise
        if self._writer is not None:
            self._checkpointer = asyncio.create_task(self._checkpoint_loop())

    def _open_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        # Checkpoints run beside the writer, on their own connection and thread, so a commit
        # never waits for one (with autocheckpoint a commit every ~4 MB of WAL would).
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    @staticmethod
    def _commit_sync(conn: sqlite3.Connection, ops: list[Op] | Job) -> None:
        """One transaction, on the writer thread."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if callable(ops):
                ops(conn)
            else:
                for sql, params, many in ops:
                    if many:
                        conn.executemany(sql, params)
                    else:
                        conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def _commit(self, ops: list[Op] | Job) -> None:
        """One transaction on the writer thread. A cancelled caller does not cancel the write, and
        `close` runs after every write submitted before it (the thread takes jobs in order)."""
        if self._writer is None:  # in memory: on aiosqlite's thread, its one connection
            async with self._lock:
                await self.db._execute(self._commit_sync, self.db._conn, ops)
            return
        job = asyncio.get_running_loop().run_in_executor(self._writer_thread, self._commit_sync, self._writer, ops)
        await asyncio.shield(job)

    async def _checkpoint_loop(self, interval: float = 1.0) -> None:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn.execute("PRAGMA busy_timeout=10000")
            while True:
                await asyncio.sleep(interval)
                try:
                    await conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except aiosqlite.Error as exc:  # busy or locked: the next round catches up
                    log.debug("checkpoint skipped: %s", exc)
        finally:
            await conn.close()

    async def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.get_running_loop().run_in_executor(self._writer_thread, writer.close)
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=True)
            self._writer_thread = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")  # serialises concurrent migrators on one file
            try:
                await self.db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
                )
                done = {row[0] for row in await self.db.execute_fetchall("SELECT version FROM schema_migrations")}
                for version, script in migration_scripts("sqlite"):
                    if version in done:
                        continue
                    for statement in split_sql(script):
                        await self.db.execute(statement)
                    await self.db.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, iso(utcnow())),
                    )
                    applied.append(version)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
        return applied

    async def _transaction(self, ops: Iterable[Op]) -> None:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params, many in ops:
                    if many:
                        await self.db.executemany(sql, params)
                    else:
                        await self.db.execute(sql, params)
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def _update_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        if params:
            await self._transaction([(sql, list(params), True)])
