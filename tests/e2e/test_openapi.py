"""The own API against its OpenAPI document (schemathesis): no 5xx, responses as documented, one error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case

from gateway.app import create_app
from gateway.openapi import DOCUMENT
from gateway.settings import FileConfig, RateLimitConfig, Settings
from tests.conftest import ADMIN_TOKEN, ANTHROPIC_KEY, GEMINI_KEY, ServerThread
from tests.fakes.polar import FakePolar, new_standard_secret, sign_webhook, webhook_payload
from tests.fakes.upstream import FakeUpstream

BILLING = ("/api/billing/status", "/api/billing/portal")


class Running:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token  # a status token for a user that exists in Polar


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream) -> Iterator[Running]:
    """One gateway for every generated case (with Polar, so no route answers 503 for being unconfigured)."""
    db: Path = tmp_path_factory.mktemp("openapi") / "gateway.db"
    with FakePolar() as polar:
        polar.add_customer("alice")
        settings_ = Settings(
            database_url=f"sqlite:///{db}",
            anthropic_api_key=ANTHROPIC_KEY,
            gemini_api_key=GEMINI_KEY,
            anthropic_upstream=upstream.url,
            gemini_upstream=upstream.url,
            admin_token=ADMIN_TOKEN,
            polar_access_token=polar.token,
            polar_base_url=polar.url,
            polar_webhook_secret=new_standard_secret(),
            file=FileConfig(
                plan={"claude_output_tokens": 1000},
                rate_limit=RateLimitConfig(requests_per_minute=None, tokens_per_minute=None),
            ),
        )
        server = ServerThread(create_app(settings_), settings_)
        server.start()
        url = f"http://127.0.0.1:{server.port}"
        try:
            resp = httpx.post(
                f"{url}/admin/status-tokens",
                json={"user_id": "alice"},
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            STATUS_TOKEN.append(resp.json()["token"])
            yield Running(url, STATUS_TOKEN[-1])
        finally:
            server.stop()


# The document is a Python dict, so the cases are generated from it at collection; they run against
# the gateway serving it (`test_the_document_is_served...` checks it serves this very document).
schema = schemathesis.openapi.from_dict(DOCUMENT)
STATUS_TOKEN: list[str] = []  # the running gateway's, for a user Polar knows


@schema.auth(refresh_interval=None)
class GatewayAuth:
    """The admin token, or on the billing routes a status token; schemathesis also probes without them."""

    def get(self, case: Case, ctx: Any) -> str:
        if case.path in BILLING:
            return STATUS_TOKEN[-1] if STATUS_TOKEN else "pgs_not-issued-yet"  # (cases are built at collection)
        return ADMIN_TOKEN

    def set(self, case: Case, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def one_error_shape(ctx: Any, response: Any, case: Case) -> bool | None:
    """Every error of the own API is JSON {"error": {"type": str, "message": str}}."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"].get("type"), str) and isinstance(body["error"].get("message"), str), body
    assert set(body["error"]) == {"type", "message"}, body
    return True


def no_server_error(ctx: Any, response: Any, case: Case) -> bool | None:
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    return True


def test_the_document_is_served_and_covers_the_own_api_only(running: Running) -> None:
    served = httpx.get(f"{running.url}/openapi.json").json()
    assert served == DOCUMENT
    assert served["openapi"].startswith("3.")
    assert not [p for p in served["paths"] if p.startswith(("/anthropic", "/gemini"))]
    assert {"/admin/keys", "/admin/status-tokens", "/api/billing/status", "/webhooks/polar"} <= set(served["paths"])


@schema.parametrize()
@settings(
    max_examples=60,  # per operation; a run of the whole document stays within seconds
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_own_api_conforms(case: Case, running: Running) -> None:
    case.call_and_validate(
        base_url=running.url,
        additional_checks=[one_error_shape, no_server_error],
        timeout=10,
    )


def test_every_route_documents_its_answer_to_a_failing_store(make_gateway: Any) -> None:
    """A database that fails is a 503 on every own route that reads it; the document must say so."""
    secret = new_standard_secret()
    gw = make_gateway(polar_webhook_secret=secret)
    key = gw.issue_key("alice")
    gw.query("DROP TABLE api_keys")
    gw.query("DROP TABLE webhook_deliveries")
    user = {"authorization": f"Bearer {key}"}
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    body, signed = sign_webhook(webhook_payload("subscription.canceled", {}), secret, legacy=False)
    calls = [
        ("get", "/api/billing/status", "/api/billing/status", user, None),
        ("get", "/api/billing/portal", "/api/billing/portal", user, None),
        ("get", "/admin/keys", "/admin/keys", admin, None),
        ("post", "/admin/keys", "/admin/keys", admin, b'{"user_id": "bob"}'),
        ("delete", "/admin/keys/{key_id}", "/admin/keys/key_1", admin, None),
        ("post", "/webhooks/polar", "/webhooks/polar", signed, body),
    ]
    for method, route, path, headers, content in calls:
        resp = httpx.request(method, gw.url + path, headers=headers, content=content)
        assert resp.status_code == 503, (method, path, resp.text)
        assert "503" in DOCUMENT["paths"][route][method]["responses"], (method, route)
