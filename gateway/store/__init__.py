"""Durable storage behind narrow protocols (see `base`); `create_store` picks the backend by URL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.store.base import (
    ApiKey,
    CustomerLimits,
    KeyStore,
    Lifecycle,
    LimitsStore,
    MeterLimit,
    Outbox,
    PendingEvent,
    RequestRecord,
    RequestStore,
    Store,
    UsageEvent,
    UsageSummaryRow,
    WebhookLog,
)

if TYPE_CHECKING:
    from gateway.settings import Settings

__all__ = [
    "ApiKey",
    "CustomerLimits",
    "KeyStore",
    "Lifecycle",
    "LimitsStore",
    "MeterLimit",
    "Outbox",
    "PendingEvent",
    "RequestRecord",
    "RequestStore",
    "Store",
    "UsageEvent",
    "UsageSummaryRow",
    "WebhookLog",
    "create_store",
]


def create_store(settings_or_url: Settings | str, *, pool_size: int | None = None) -> Store:
    """The store for `sqlite:///path` or `postgresql://user[:password]@host[:port]/db` (not opened yet).

    `pool_size` (PostgreSQL connections) defaults to the settings' `database_pool_size`, else 10.
    """
    if isinstance(settings_or_url, str):
        url, size = settings_or_url, pool_size or 10
    else:
        url, size = settings_or_url.database_url, pool_size or settings_or_url.database_pool_size
    if url.startswith("sqlite:///"):
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(url.removeprefix("sqlite:///"))
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from gateway.store.postgres import PostgresStore
        except ImportError as exc:  # asyncpg is the extra `postgres`
            raise RuntimeError("the PostgreSQL store needs asyncpg: pip install 'polar-gateway[postgres]'") from exc
        return PostgresStore(url, size)
    raise ValueError("database URL must look like sqlite:///path/to.db or postgresql://user@host:5432/db")
