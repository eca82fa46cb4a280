"""A throw-away PostgreSQL database for the gateway-pg contender: create, find its backends, drop."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from typing import Any

import asyncpg

from .settings import PG_ADMIN_DSN


def _run(sql: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


class PgDatabase:
    """`bench_<random>` on the local server (other users of the server never see it)."""

    def __init__(self, prefix: str = "bench") -> None:
        self.name = f"{prefix}_{secrets.token_hex(4)}"
        _run(f'CREATE DATABASE "{self.name}"')
        self.url = PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{self.name}"
        self.pinned: set[int] = set()

    def backend_pids(self) -> list[int]:
        rows = _run("SELECT pid FROM pg_stat_activity WHERE datname = $1", self.name)
        return [int(r["pid"]) for r in rows]

    def pin_backends(self, cpu: str) -> list[int]:
        """Pin this database's server backends to `cpu` (the pool grows under load, so call it per
        cell) and return their pids, so their CPU is neither on the contender's core nor 'foreign'."""
        pids = self.backend_pids()
        for pid in set(pids) - self.pinned:
            done = subprocess.run(["taskset", "-p", "-c", cpu, str(pid)], capture_output=True)
            if done.returncode == 0:
                self.pinned.add(pid)
        return pids

    def drop(self) -> None:
        _run(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
