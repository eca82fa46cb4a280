"""The admin API and the dashboard on a store that fails or does not answer: a 503 in their own shape,
never a bare 500 and never a wait longer than GATEWAY_STORE_TIMEOUT_SECONDS. (A store that stops
answering on a real network: tests/e2e/test_store_hangs.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.http_api import StoreUnavailable, from_store
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN, poll_until
from tests.support_dashboard import csrf_of
from tests.support_db import Database

ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
DSN_SECRET = "hunter2"
FAILED = {"error": {"type": "unavailable", "message": "the gateway's database failed to answer; retry later"}}
CALLS = [
    ("POST", "/admin/keys", {"user_id": "alice", "name": "web"}),
    ("GET", "/admin/keys", None),
    ("DELETE", "/admin/keys/key_0123456789abcdef", None),
]


async def failing(*args: Any, **kwargs: Any) -> Any:
    raise OSError(f"could not reach postgresql://gateway:{DSN_SECRET}@db.internal/gateway")


@pytest.fixture
def client(db: Database, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db.url, journal_dir=str(tmp_path / "journal"), admin_token=ADMIN_TOKEN, store_timeout_seconds=0.5
    )
    app = create_app(settings)
    with TestClient(app, base_url="http://gw", raise_server_exceptions=False, follow_redirects=False) as c:
        yield c


def fail_keys(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    store = client.app.services.store  # type: ignore[attr-defined]
    for name in ("create_key", "list_keys", "revoke_key"):
        monkeypatch.setattr(store, name, failing)


def test_a_store_that_raises_is_a_503_not_a_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.api")
    fail_keys(client, monkeypatch)
    for method, path, body in CALLS:
        resp = client.request(method, path, json=body, headers=ADMIN)
        assert (resp.status_code, resp.json()) == (503, FAILED), f"{method} {path}: {resp.text}"
        assert DSN_SECRET not in resp.text
    # one line each, with the traceback (a failure, not a timeout)
    records = [r for r in caplog.records if r.name == "gateway.api"]
    assert [(r.levelno, r.exc_info is not None) for r in records] == [(logging.ERROR, True)] * 3
    assert records[0].getMessage() == "admin API: issuing a key for alice"
    # Input refused before the store is asked is still a 400, not a 503.
    resp = client.post("/admin/keys", json={"user_id": ".."}, headers=ADMIN)
    assert resp.status_code == 400, resp.text


def test_a_dashboard_form_on_a_store_that_raises_is_a_503_page(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.post("/admin/signin", data={"token": ADMIN_TOKEN}).status_code == 303
    csrf = csrf_of(client.get("/admin/users/alice").text)
    fail_keys(client, monkeypatch)
    for path in ("/admin/users/alice/keys", "/admin/users/alice/keys/key_x/revoke"):
        resp = client.post(path, data={"csrf": csrf, "name": "web"})
        assert resp.status_code == 503, resp.text
        assert "<h1>Database unavailable</h1>" in resp.text and "failed to answer" in resp.text
        assert DSN_SECRET not in resp.text
    assert client.get("/admin/users/alice").status_code == 503  # a page that lists the keys


async def test_a_store_call_is_given_up_on_at_the_deadline_and_hands_back_what_it_did_late() -> None:
    release = asyncio.Event()
    done: list[bool] = []

    async def slow() -> bool:
        await release.wait()
        return True

    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.2 s; retry later"):
        await from_store(slow(), 0.2, "test", late=done.append)
    assert 0.2 <= time.monotonic() - started < 0.7
    assert done == []
    release.set()
    await poll_until(lambda: done)
    assert done == [True]


def test_the_billing_endpoints_on_a_store_that_raises_are_a_503_not_a_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = client.post("/admin/keys", json={"user_id": "alice", "name": "web"}, headers=ADMIN).json()["key"]
    monkeypatch.setattr(client.app.services.store, "find_key", failing)  # type: ignore[attr-defined]
    for path in ("/api/billing/status", "/api/billing/portal"):
        resp = client.get(path, headers={"x-api-key": key})
        assert (resp.status_code, resp.json()) == (503, FAILED), f"{path}: {resp.text}"
        assert resp.headers["retry-after"] == "1"
        assert DSN_SECRET not in resp.text
