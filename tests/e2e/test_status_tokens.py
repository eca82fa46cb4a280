"""Status tokens over HTTP: issued by the admin, read the billing routes only, expire; the widget and CORS."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import anthropic
import httpx
import pytest
from google import genai
from google.genai import errors, types

from tests.conftest import ADMIN_TOKEN, Gateway, wait_until
from tests.fakes.polar import FakePolar
from tests.fakes.upstream import FakeUpstream

MSG = [{"role": "user", "content": "Hello"}]


def with_polar(make_gateway: Callable[..., Gateway], polar: FakePolar, **kw: object) -> Gateway:
    return make_gateway(polar_access_token=polar.token, polar_base_url=polar.url, **kw)


def status(gw: Gateway, token: str) -> httpx.Response:
    return httpx.get(f"{gw.url}/api/billing/status", headers={"authorization": f"Bearer {token}"})


def test_admin_issues_tokens_and_validates_input(gateway: Gateway) -> None:
    url = f"{gateway.url}/admin/status-tokens"
    resp = httpx.post(url, json={"user_id": "alice"})
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"
    with gateway.admin() as admin:
        before = time.time()
        resp = admin.post("/admin/status-tokens", json={"user_id": "alice"})
        assert resp.status_code == 201
        body = resp.json()
        assert set(body) == {"token", "user_id", "expires_at"} and body["user_id"] == "alice"
        expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00")).timestamp()
        assert before + 900 <= expires <= time.time() + 901
        for ok in (86400, 60.0):
            assert admin.post("/admin/status-tokens", json={"user_id": "a", "ttl_seconds": ok}).status_code == 201
        for bad in (0, -5, 86401, "60", True, 1.5, None):
            resp = admin.post("/admin/status-tokens", json={"user_id": "alice", "ttl_seconds": bad})
            assert resp.status_code == 400, bad
            assert "ttl_seconds" in resp.json()["error"]["message"]
        for bad_body in ({"user_id": "a/b"}, {"user_id": 5}, {}, []):
            assert admin.post("/admin/status-tokens", json=bad_body).status_code == 400, bad_body
        resp = admin.post("/admin/status-tokens", content=b"{")
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request"


def test_token_reads_status_and_portal_like_the_key(
    make_gateway: Callable[..., Gateway], fake: FakePolar, upstream: FakeUpstream
) -> None:
    gw = with_polar(make_gateway, fake, plan={"claude_output_tokens": 100, "claude_input_tokens": 1000})
    key = gw.issue_key("alice")
    c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    for _ in range(2):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    gw.wait_recorded("alice", 2)
    token = gw.status_token("alice")
    by_token = status(gw, token)
    assert by_token.status_code == 200
    by_key = httpx.get(f"{gw.url}/api/billing/status", headers={"x-api-key": key}).json()
    assert by_token.json() == by_key
    out = next(m for m in by_key["meters"] if m["name"] == "claude_output_tokens")
    assert (out["consumed"], out["credited"], out["percentUsed"]) == (18, 100, 18.0)
    assert by_key["userId"] == "alice"

    fake.add_customer("alice")
    gw.assert_portal(fake, token, "https://app.example.com/")
    # Only as a bearer token: the api-key headers take gateway keys alone.
    assert httpx.get(f"{gw.url}/api/billing/status", headers={"x-api-key": token}).status_code == 401


def test_token_is_refused_by_provider_routes(gateway: Gateway, upstream: FakeUpstream) -> None:
    gateway.issue_key("alice")
    token = gateway.status_token("alice")
    before = len(upstream.requests)
    for client in (
        anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key=token, max_retries=0),
        anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", auth_token=token, max_retries=0),
    ):
        with pytest.raises(anthropic.AuthenticationError) as err:
            client.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=MSG)  # type: ignore[arg-type]
        assert err.value.status_code == 401
        assert err.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid or revoked gateway key"},
        }
    gemini = genai.Client(api_key=token, http_options=types.HttpOptions(base_url=f"{gateway.url}/gemini"))
    with pytest.raises(errors.ClientError) as gerr:
        gemini.models.generate_content(model="gemini-2.5-flash", contents="Hi")
    assert gerr.value.code == 401 and gerr.value.status == "UNAUTHENTICATED"
    assert len(upstream.requests) == before
    assert gateway.requests("alice") == []


def test_token_expires(gateway: Gateway) -> None:
    token = gateway.status_token("alice", ttl_seconds=1)
    assert status(gateway, token).status_code == 200
    resp = wait_until(lambda: (r := status(gateway, token)).status_code == 401 and r, timeout=5, interval=0.1)
    assert resp.json() == {"error": {"type": "authentication_error", "message": "invalid or expired status token"}}


def test_forged_tokens_are_refused(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(status_token_secret="one secret")
    other = make_gateway(status_token_secret="another secret")
    token = gw.status_token("alice")
    assert status(gw, token).status_code == 200
    assert status(other, token).status_code == 401
    i = len(token) - 5
    flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    assert status(gw, flipped).status_code == 401
    assert status(gw, token.replace("pgs_", "pgw_", 1)).status_code == 401


def test_admin_token_rotation_invalidates_derived_tokens(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()
    token = gw.status_token("alice")
    rotated = make_gateway(admin_token=ADMIN_TOKEN + "-new")
    assert status(gw, token).status_code == 200 and status(rotated, token).status_code == 401


def test_widget_script_is_served_with_caching(gateway: Gateway) -> None:
    resp = httpx.get(f"{gateway.url}/static/healthbar.js")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/javascript; charset=utf-8"
    assert resp.headers["cache-control"] == "public, max-age=3600"
    assert 'customElements.define("gateway-healthbar"' in resp.text
    etag = resp.headers["etag"]
    again = httpx.get(f"{gateway.url}/static/healthbar.js", headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert httpx.head(f"{gateway.url}/static/healthbar.js").status_code == 200
    assert httpx.get(f"{gateway.url}/static/nope.js").json()["error"]["type"] == "not_found"
    assert httpx.get(f"{gateway.url}/static/healthbar.js/").status_code == 404


def _preflight(gw: Gateway, path: str, origin: str) -> httpx.Response:
    return httpx.options(
        f"{gw.url}{path}",
        headers={
            "origin": origin,
            "access-control-request-method": "GET",
            "access-control-request-headers": "authorization",
        },
    )


def test_cors_for_configured_origins_on_the_billing_routes_and_widget_only(
    make_gateway: Callable[..., Gateway],
) -> None:
    app = "https://app.example.com"
    gw = make_gateway(cors_origins=f"{app}, http://localhost:3000")
    for path in ("/api/billing/status", "/api/billing/portal", "/static/healthbar.js"):
        resp = _preflight(gw, path, app)
        assert resp.status_code == 200, path
        assert resp.headers["access-control-allow-origin"] == app
        assert "authorization" in resp.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-origin" not in _preflight(gw, path, "https://evil.example.com").headers
    token = gw.status_token("alice")
    resp = httpx.get(f"{gw.url}/api/billing/status", headers={"authorization": f"Bearer {token}", "origin": app})
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == app
    resp = httpx.get(f"{gw.url}/api/billing/status", headers={"origin": app})
    assert resp.status_code == 401 and resp.headers["access-control-allow-origin"] == app  # the widget can read why
    for path in ("/admin/keys", "/admin/status-tokens", "/anthropic/v1/messages", "/webhooks/polar", "/healthz"):
        assert "access-control-allow-origin" not in _preflight(gw, path, app).headers, path
    resp = httpx.get(f"{gw.url}/healthz", headers={"origin": app})
    assert "access-control-allow-origin" not in resp.headers


def test_no_cors_by_default(gateway: Gateway) -> None:
    resp = _preflight(gateway, "/api/billing/status", "https://app.example.com")
    assert resp.status_code == 405 and "access-control-allow-origin" not in resp.headers
    assert resp.json()["error"]["type"] == "method_not_allowed"


def test_cors_origins_setting_is_validated() -> None:
    from gateway.settings import ConfigError, settings_from_env

    env = {"GATEWAY_CORS_ORIGINS": "https://a.example.com, http://localhost:3000"}
    assert settings_from_env(env, load_file=False).cors_origin_list == [
        "https://a.example.com",
        "http://localhost:3000",
    ]
    assert settings_from_env({}, load_file=False).cors_origin_list == []
    for bad in ("a.example.com", "https://a.example.com/path", "ftp://x", "https://"):
        with pytest.raises(ConfigError, match="GATEWAY_CORS_ORIGINS"):
            settings_from_env({"GATEWAY_CORS_ORIGINS": bad}, load_file=False)


def test_demo_page_is_admin_only_and_embeds_a_working_token(gateway: Gateway) -> None:
    url = f"{gateway.url}/admin/healthbar-demo"
    assert httpx.get(url, params={"user_id": "alice"}).status_code == 401
    with gateway.admin() as admin:
        assert admin.get("/admin/healthbar-demo").status_code == 400
        assert admin.get("/admin/healthbar-demo", params={"user_id": "a/b"}).status_code == 400
        assert admin.get("/admin/healthbar-demo", params={"user_id": "a", "ttl_seconds": "0"}).status_code == 400
        assert admin.get("/admin/healthbar-demo", params={"user_id": "a", "refresh": "x"}).status_code == 400
        resp = admin.get("/admin/healthbar-demo", params={"user_id": "alice", "refresh": "5"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html") and resp.headers["cache-control"] == "no-store"
    html = resp.text
    assert f'<script type="module" src="{gateway.url}/static/healthbar.js"></script>' in html
    token = html.split('token="', 1)[1].split('"', 1)[0]
    assert token.startswith("pgs_") and 'refresh="5"' in html
    assert status(gateway, token).json()["userId"] == "alice"


def test_healthz_reports_the_sync_backlog_and_polar(make_gateway: Callable[..., Gateway], fake: FakePolar) -> None:
    gw = with_polar(
        make_gateway, fake, sync_interval_seconds=0.1, sync_backoff_seconds=0.1, sync_backoff_max_seconds=0.2
    )

    def health() -> dict[str, object]:
        resp = httpx.get(f"{gw.url}/healthz")
        assert resp.status_code == 200
        sync: dict[str, object] = resp.json()["sync"]
        return sync

    key = gw.issue_key("alice")
    fake.down(True)
    c = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)
    for _ in range(3):
        c.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=MSG)  # type: ignore[arg-type]
    gw.wait_recorded("alice", 3)
    down = wait_until(lambda: (h := health())["polar_ok"] is False and h["pending"] == 3 and h, timeout=10)
    assert down["failed"] == 0
    first = datetime.fromisoformat(gw.requests("alice")[0]["started_at"].replace("Z", "+00:00"))
    age = down["oldest_pending_age_seconds"]
    assert isinstance(age, float) and 0 < age <= (datetime.now(UTC) - first).total_seconds() + 0.01
    fake.down(False)
    up = wait_until(lambda: (h := health())["pending"] == 0 and h, timeout=10)
    assert up == {"pending": 0, "failed": 0, "oldest_pending_age_seconds": None, "polar_ok": True}
    assert len(fake.events) == 6


def test_demo_page_says_which_number_it_wants_for_any_bad_one(gateway: Gateway) -> None:
    # A Unicode digit passes str.isdigit() but not int(), and int() refuses over 4300 digits: each once
    # answered with Python's own message (naming sys.set_int_max_str_digits) instead of the range.
    with gateway.admin() as admin:
        for name, low, high in (("ttl_seconds", 1, 86400), ("refresh", 1, 3600)):
            wanted = {"type": "invalid_request", "message": f"{name} must be an integer from {low} to {high}"}
            for bad in ("²", "٣", "9" * 5000, "-1", "1.5", "", "0" * 5000):
                resp = admin.get("/admin/healthbar-demo", params={"user_id": "alice", name: bad})
                assert (resp.status_code, resp.json()) == (400, {"error": wanted}), (name, bad)
        resp = admin.get("/admin/healthbar-demo", params={"user_id": "alice", "refresh": "0" * 5000 + "7"})
        assert resp.status_code == 200 and 'refresh="7"' in resp.text
