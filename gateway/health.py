"""`/healthz`: 200 while the gateway serves, with what an operator watches: the store and the Polar sync backlog."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.store.base import SyncBacklog
from gateway.timeutil import utcnow

log = logging.getLogger("gateway.health")

# A store that does not answer this fast is reported as unknown; the gateway may still serve.
_BACKLOG_TIMEOUT_SECONDS = 1.0


class BacklogSource(Protocol):
    async def sync_backlog(self) -> SyncBacklog: ...


def healthz_route(outbox: BacklogSource, unstored: Callable[[], int], polar_ok: Callable[[], bool | None]) -> Route:
    """`unstored`: finished requests the store has not taken yet (journaled, so not lost); `polar_ok`:
    whether the last Polar call worked (None when Polar is not configured or not called yet)."""

    async def healthz(request: Request) -> Response:
        sync: dict[str, Any] = {"pending": None, "failed": None, "oldest_pending_age_seconds": None}
        try:
            backlog = await asyncio.wait_for(outbox.sync_backlog(), _BACKLOG_TIMEOUT_SECONDS)
        except Exception as exc:  # the store being down is reported, not a failed health check
            log.warning("healthz: sync backlog unavailable: %s", type(exc).__name__)
        else:
            oldest = backlog.oldest_pending_at
            sync = {
                "pending": backlog.pending,
                "failed": backlog.failed,
                "oldest_pending_age_seconds": (
                    round(max(0.0, (utcnow() - oldest).total_seconds()), 3) if oldest is not None else None
                ),
            }
        sync["polar_ok"] = polar_ok()
        return JSONResponse({"status": "ok", "unstored": unstored(), "sync": sync})

    return Route("/healthz", healthz, methods=["GET"])
