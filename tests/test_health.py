"""/healthz stays 200 while the gateway serves, whatever the store and Polar are doing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from starlette.applications import Starlette

from gateway.health import healthz_route
from gateway.store.base import SyncBacklog
from gateway.timeutil import utcnow


class Backlog:
    def __init__(self, result: SyncBacklog | None = None, error: Exception | None = None, hang: bool = False) -> None:
        self.result, self.error, self.hang = result, error, hang

    async def sync_backlog(self) -> SyncBacklog:
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


async def health(source: Backlog, polar_ok: bool | None = None) -> httpx.Response:
    app = Starlette(routes=[healthz_route(source, lambda: 3, lambda: polar_ok)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.get("/healthz")


async def test_reports_the_backlog_and_its_age() -> None:
    oldest = utcnow() - timedelta(seconds=90)
    resp = await health(Backlog(SyncBacklog(pending=5, failed=2, oldest_pending_at=oldest)), polar_ok=False)
    assert resp.status_code == 200
    body = resp.json()
    assert (body["status"], body["unstored"]) == ("ok", 3)
    sync = body["sync"]
    assert (sync["pending"], sync["failed"], sync["polar_ok"]) == (5, 2, False)
    assert 90 <= sync["oldest_pending_age_seconds"] < 100


async def test_a_failing_or_stuck_store_is_unknown_not_unhealthy() -> None:
    unknown = {"pending": None, "failed": None, "oldest_pending_age_seconds": None, "polar_ok": True}
    for source in (Backlog(error=OSError("database is locked")), Backlog(hang=True)):
        resp = await health(source, polar_ok=True)
        assert resp.status_code == 200
        assert resp.json()["sync"] == unknown
