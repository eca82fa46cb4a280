"""The gateway's own API answers every error in its one JSON shape, with CORS headers where a browser
on an allowed origin must read it."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.conftest import Gateway
from tests.fakes.polar import FakePolar


def assert_error_shape(resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers.get("content-type", "").startswith("application/json"), (resp.headers, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body


def test_portal_unparseable_return_url_is_a_json_400(make_gateway: Callable[..., Gateway], fake: FakePolar) -> None:
    gw = make_gateway(polar_access_token=fake.token, polar_base_url=fake.url)
    key = gw.issue_key("alice")
    fake.add_customer("alice")
    for bad in ("http://[::1", "https://a]b/", "http://[nothost]/"):
        resp = httpx.get(f"{gw.url}/api/billing/portal", params={"return_url": bad}, headers={"x-api-key": key})
        assert_error_shape(resp, 400)
        assert resp.json()["error"]["type"] == "invalid_request", bad


def test_refused_cors_preflight_uses_the_json_error_shape(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(cors_origins="https://app.example.com")
    for origin, headers in (("https://evil.example.com", "authorization"), ("https://app.example.com", "x-api-key")):
        resp = httpx.options(
            f"{gw.url}/api/billing/status",
            headers={
                "origin": origin,
                "access-control-request-method": "GET",
                "access-control-request-headers": headers,
            },
        )
        assert_error_shape(resp, 400)


def test_errors_under_the_cors_prefix_carry_cors_headers(make_gateway: Callable[..., Gateway]) -> None:
    app = "https://app.example.com"
    gw = make_gateway(cors_origins=app)
    resp = httpx.get(f"{gw.url}/api/billing/nope", headers={"origin": app})
    assert_error_shape(resp, 404)
    assert resp.headers.get("access-control-allow-origin") == app
