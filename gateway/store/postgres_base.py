"""PostgreSQL connection pool and migrations: the machinery under `PostgresStore`.

asyncpg (the extra `postgres`) is imported here only, so an install without it runs on SQLite.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

import asyncpg

from gateway.store.schema import migration_scripts

log = logging.getLogger("gateway.store")

# pg_advisory_xact_lock key of `migrate`: replicas starting together apply the schema one at a time.
_MIGRATE_LOCK = 0x6761_7465_7761_7901  # "gateway" + 1

# A database that vanishes without closing its connections (its host gone, a partition that drops packets)
# must not leave a query waiting for ever: asyncpg sets no client-side TCP keepalive (asyncpg#606), and the
# recorder, the sync and the lease keeper wait on the store without a deadline. With these the kernel ends
# such a connection within ~30 s, the waiting call fails, and those loops retry on a fresh connection.
_LIVENESS: tuple[tuple[int, int | None, int], ...] = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 10),  # the first probe after 10 s of silence
    (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 5),
    (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
    # Data sent and not acknowledged for this long (ms) ends it too: a query sent into the void.
    (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), 30_000),
)


def watch_liveness(transport: Any) -> None:
    """Have the kernel notice when the peer of `transport`'s TCP connection is gone (see `_LIVENESS`)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket: its peer cannot vanish unnoticed
    for level, option, value in _LIVENESS:
        if option is not None:  # (not every platform has every option)
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


class Connection(asyncpg.Connection):
    """asyncpg's connection, its socket set to notice a database that vanished (`watch_liveness`)."""

    def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(protocol, transport, *args, **kwargs)
        watch_liveness(transport)


# What a record's own values cause: SQLSTATE class 22 (data exceptions, the encoding error of a NUL
# among them) and 23 (constraints), and a value asyncpg cannot encode for its column (client side).
# Connections lost, timeouts and the rest are outages.
_REFUSALS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,
    OverflowError,
    TypeError,
    ValueError,
)


def refused(exc: BaseException) -> bool:
    """Whether the database refused a write for the records' sake (see `_REFUSALS`), not for its own."""
    return isinstance(exc, _REFUSALS)


class PostgresBase:
    def __init__(self, dsn: str, pool_size: int = 10) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=min(2, self.pool_size),
            max_size=self.pool_size,
            server_settings={"timezone": "UTC"},
            reset=_keep_session,
            connection_class=Connection,
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self.pool.acquire() as conn, conn.transaction():
            # Held to the end of the transaction: a second migrator waits, then finds everything applied.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version text PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, script in migration_scripts("postgres"):
                if version in done:
                    continue
                await conn.execute(script)  # (no parameters: the simple protocol runs the whole script)
                await conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())", version)
                applied.append(version)
        return applied


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is: asyncpg's default reset is one more round trip
    per use (unlock all advisory locks, close cursors, unlisten, RESET ALL), and the store leaves
    none of that behind: its advisory locks are transaction-scoped, it declares no cursors, listens
    on no pooled connection and sets nothing. (An open transaction is still rolled back on release.)"""


def affected(status: str) -> int:
    """Rows an UPDATE/INSERT/DELETE touched, from asyncpg's status string ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1])
