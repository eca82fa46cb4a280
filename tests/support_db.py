"""Test databases on either backend: a fresh SQLite file, or a fresh schema in a PostgreSQL database
created for the test session. `GATEWAY_TEST_DATABASE=postgres` runs the suite's gateways and stores
on PostgreSQL (`GATEWAY_TEST_PG`: the server, `postgresql://postgres@127.0.0.1:5432` by default)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sqlite3
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from gateway.store import Store, create_store
from gateway.timeutil import iso

T = TypeVar("T")

TEST_DATABASE = os.environ.get("GATEWAY_TEST_DATABASE", "sqlite")
if TEST_DATABASE not in ("sqlite", "postgres"):
    raise RuntimeError(f"GATEWAY_TEST_DATABASE must be sqlite or postgres, got {TEST_DATABASE!r}")
PG_SERVER = os.environ.get("GATEWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a loop of its own in a thread: callable from sync and async tests alike."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make()).result()


class PgServer:
    """One database for the test session (created on first use, dropped at the end); a schema per test."""

    def __init__(self, server: str = PG_SERVER) -> None:
        self.server = server
        self.name = f"gw_test_{secrets.token_hex(4)}"
        self.created = False
        self.unreachable: str | None = None

    async def _admin(self, sql: str) -> None:
        last: Exception | None = None
        for maintenance in ("postgres", "test"):
            try:
                conn = await asyncpg.connect(f"{self.server}/{maintenance}", timeout=5)
            except (TimeoutError, OSError, asyncpg.InvalidCatalogNameError) as exc:
                last = exc
                continue
            try:
                await conn.execute(sql)
                return
            finally:
                await conn.close()
        raise OSError(f"PostgreSQL at {self.server} is not reachable: {last}")

    def new_schema(self) -> str:
        """The URL of a fresh, empty schema."""
        if self.unreachable:
            raise OSError(self.unreachable)
        if not self.created:
            try:
                run_async(lambda: self._admin(f'CREATE DATABASE "{self.name}"'))
            except OSError as exc:
                self.unreachable = str(exc)
                raise
            self.created = True
        schema = f"t_{secrets.token_hex(6)}"
        url = f"{self.server}/{self.name}"

        async def create() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(f"CREATE SCHEMA {schema}")
            finally:
                await conn.close()

        run_async(create)
        return f"{url}?search_path={schema}"

    def drop(self) -> None:
        if self.created:
            run_async(lambda: self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))


def _sqlite_shape(value: Any) -> Any:
    """A PostgreSQL value as SQLite gives it back, so tests compare rows alike: booleans as 0/1,
    timestamps as the store's ISO text ('' for the '-infinity' of a retry due at once)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, datetime):
        return iso(value) if value.tzinfo is not None else ""
    return value


class Database:
    """A test's database, read and written with plain SQL (`?` placeholders) from sync or async tests.
    Rows come back in SQLite's shape on both backends (see `_sqlite_shape`); JSON columns as text."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_postgres = url.startswith("postgresql://")

    @property
    def path(self) -> Path:
        if self.is_postgres:
            pytest.skip("reads the SQLite file itself")
        return Path(self.url.removeprefix("sqlite:///"))

    def dicts(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        if not self.is_postgres:
            conn = sqlite3.connect(self.path)
            conn.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in conn.execute(sql, params).fetchall()]
                conn.commit()
                return rows
            finally:
                conn.close()
        numbered = iter(range(1, 1000))
        pg_sql = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)

        async def fetch() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.url)
            try:
                return [{k: _sqlite_shape(v) for k, v in r.items()} for r in await conn.fetch(pg_sql, *params)]
            finally:
                await conn.close()

        return run_async(fetch)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return [tuple(r.values()) for r in self.dicts(sql, *params)]

    def usage(self, user_id: str | None = None) -> dict[str, int]:
        """Recorded usage per meter (of one user, or everyone)."""
        each = "jsonb_each_text(r.usage)" if self.is_postgres else "json_each(r.usage)"
        value = "u.value::bigint" if self.is_postgres else "u.value"
        where = "" if user_id is None else "AND r.user_id = ?"
        rows = self.query(
            f"SELECT u.key, SUM({value}) FROM requests AS r, {each} AS u WHERE {value} > 0 {where} GROUP BY u.key",
            *(() if user_id is None else (user_id,)),
        )
        return {m: int(v) for m, v in rows}


class Databases:
    """Makes a fresh database per call; `backend` defaults to GATEWAY_TEST_DATABASE."""

    def __init__(self, tmp_path: Path, pg: PgServer) -> None:
        self.tmp_path = tmp_path
        self.pg = pg

    def new(self, name: str = "gateway", backend: str = TEST_DATABASE) -> Database:
        if backend == "sqlite":
            return Database(f"sqlite:///{self.tmp_path / name}.db")
        try:
            return Database(self.pg.new_schema())
        except OSError as exc:
            if TEST_DATABASE == "postgres":
                raise
            pytest.skip(f"no PostgreSQL for the postgres variant: {exc}")


async def open_store(url: str) -> Store:
    store = create_store(url, pool_size=4)
    await store.open()
    await store.migrate()
    return store
