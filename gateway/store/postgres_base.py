"""PostgreSQL connection pool and migrations: the machinery under `PostgresStore`.

asyncpg (the extra `postgres`) is imported here only, so an install without it runs on SQLite.
"""

from __future__ import annotations

import logging

import asyncpg

from gateway.store.schema import migration_scripts

log = logging.getLogger("gateway.store")

# pg_advisory_xact_lock key of `migrate`: replicas starting together apply the schema one at a time.
_MIGRATE_LOCK = 0x6761_7465_7761_7901  # "gateway" + 1


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
