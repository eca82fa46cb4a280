"""The admin dashboard over HTTP: sign-in, sessions, CSRF, keys, re-queueing, pages."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import pytest

from gateway.app import create_app
from gateway.dashboard.auth import SessionSigner
from gateway.settings import Settings, settings_from_env
from tests.conftest import ADMIN_TOKEN, Gateway, wait_until
from tests.fakes.polar import FakePolar
from tests.support_dashboard import csrf_of, signed_in

MSG = [{"role": "user", "content": "Hello"}]
CONFIG = str(Path(__file__).resolve().parents[2] / "config" / "gateway.toml")
PAGES = ["/admin", "/admin/users", "/admin/users?q=a", "/admin/users/alice", "/admin/sync"]
ACTIONS = [
    "/admin/users/alice/keys",
    "/admin/users/alice/keys/key_x/revoke",
    "/admin/sync/requeue",
    "/admin/signout",
]


def claude(gw: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0)


def ask(gw: Gateway, key: str, max_tokens: int = 16) -> None:
    claude(gw, key).messages.create(model="claude-sonnet-4-6", max_tokens=max_tokens, messages=MSG)  # type: ignore[arg-type]


@pytest.fixture
def polar() -> Iterator[FakePolar]:
    with FakePolar() as fake:
        yield fake


def test_signin_with_the_admin_token_sets_a_strict_httponly_session_cookie(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        form = client.get("/admin/signin")
        assert form.status_code == 200 and 'name="token"' in form.text
        resp = client.post("/admin/signin", data={"token": ADMIN_TOKEN})
        assert resp.status_code == 303 and resp.headers["location"] == "/admin"
        cookie = resp.headers["set-cookie"]
        attrs = [a.strip() for a in cookie.split(";")]
        assert attrs[0].startswith("gw_admin=") and ADMIN_TOKEN not in cookie
        assert {"HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age=28800"} <= set(attrs)
        assert "Secure" not in attrs  # plain http here; https requests get it
        page = client.get("/admin")
        assert page.status_code == 200 and "<h1>Overview</h1>" in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        # signed in, the sign-in page sends you on
        assert client.get("/admin/signin").headers["location"] == "/admin"


def test_wrong_token_gets_the_signin_page_with_an_error_and_no_cookie(gateway: Gateway) -> None:
    for data in ({"token": "wrong"}, {"token": ""}, {"nothing": "x"}):
        resp = httpx.post(f"{gateway.url}/admin/signin", data=data)
        assert resp.status_code == 401 and "Wrong admin token." in resp.text
        assert "set-cookie" not in resp.headers
    resp = httpx.post(f"{gateway.url}/admin/signin", json={"token": ADMIN_TOKEN})  # not a form
    assert resp.status_code == 400 and "set-cookie" not in resp.headers


def test_ten_wrong_tokens_refuse_the_address_even_the_right_token(gateway: Gateway) -> None:
    for _ in range(10):
        assert httpx.post(f"{gateway.url}/admin/signin", data={"token": "guess"}).status_code == 401
    resp = httpx.post(f"{gateway.url}/admin/signin", data={"token": ADMIN_TOKEN})
    assert resp.status_code == 429 and "set-cookie" not in resp.headers
    wait = int(resp.headers["retry-after"])
    assert 590 <= wait <= 600
    assert f"Too many wrong admin tokens: try again in {wait} s." in resp.text
    # the admin API counts the same failures: this address is refused there too
    refused = httpx.get(f"{gateway.url}/admin/keys", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert refused.status_code == 429 and 590 <= int(refused.headers["retry-after"]) <= 600
    assert refused.json() == {
        "error": {"type": "rate_limit_error", "message": "too many wrong admin tokens from this address"}
    }


def test_missing_bad_expired_or_forged_sessions_and_user_keys_are_sent_to_signin(gateway: Gateway) -> None:
    user_key = gateway.issue_key("alice")
    good = SessionSigner(ADMIN_TOKEN).issue()
    expiry, nonce, mac = good.split(".")
    cookies: list[dict[str, str]] = [
        {},
        {"gw_admin": ""},
        {"gw_admin": "garbage"},
        {"gw_admin": SessionSigner(ADMIN_TOKEN).issue(now=time.time() - 9 * 3600)},  # expired
        {"gw_admin": SessionSigner("another-token").issue()},  # forged with another key
        {"gw_admin": f"{int(expiry) + 3600}.{nonce}.{mac}"},  # expiry pushed back
        {"gw_admin": f"{expiry}.{nonce}x.{mac}"},
        {"gw_admin": user_key},
        {"gw_admin": ADMIN_TOKEN},
    ]
    headers: list[dict[str, str]] = [
        {"authorization": f"Bearer {user_key}"},
        {"x-api-key": user_key},
        {"authorization": f"Bearer {ADMIN_TOKEN}"},  # the API token opens the API, not the pages
    ]
    tries = [(c, {}) for c in cookies] + [({}, h) for h in headers]
    for cookie, header in tries:
        with httpx.Client(base_url=gateway.url, cookies=cookie, headers=header, timeout=10) as client:
            for path in PAGES:
                resp = client.get(path)
                assert (resp.status_code, resp.headers.get("location")) == (303, "/admin/signin"), (path, cookie)
            for path in ACTIONS:
                resp = client.post(path, data={"csrf": "x", "name": "n"})
                assert (resp.status_code, resp.headers.get("location")) == (303, "/admin/signin"), (path, cookie)
    # the good session opens every page
    with httpx.Client(base_url=gateway.url, cookies={"gw_admin": good}, timeout=10) as client:
        assert [client.get(p).status_code for p in PAGES] == [200] * len(PAGES)
    assert gateway.query("SELECT user_id, revoked_at FROM api_keys") == [("alice", None)]  # nothing changed


def test_posts_without_the_sessions_csrf_token_are_403_and_change_nothing(
    make_gateway: Callable[..., Gateway], polar: FakePolar
) -> None:
    gw = make_gateway(
        polar_access_token=polar.token, polar_base_url=polar.url, sync_max_attempts=1, sync_interval_seconds=0.2
    )
    key = gw.issue_key("alice")
    key_id = gw.query("SELECT id FROM api_keys")[0][0]
    polar.reject_when(lambda e: "customer unknown")
    ask(gw, key)
    wait_until(lambda: gw.query("SELECT sync_state FROM requests") == [("failed",)], timeout=10)
    with signed_in(gw) as other:
        other_csrf = csrf_of(other.get("/admin/users/alice").text)
    with signed_in(gw) as client:
        for csrf in (None, "", "wrong", other_csrf):  # another session's token is no good either
            data = {} if csrf is None else {"csrf": csrf}
            for path in (
                "/admin/users/alice/keys",
                f"/admin/users/alice/keys/{key_id}/revoke",
                "/admin/sync/requeue",
                "/admin/signout",
            ):
                resp = client.post(path, data=data)
                assert resp.status_code == 403, (path, csrf)
                assert "did not come from the dashboard" in resp.text
        assert client.post("/admin/sync/requeue", json={"csrf": "x"}).status_code == 403  # not a form
        assert client.get("/admin").status_code == 200  # still signed in
    assert gw.query("SELECT id, revoked_at FROM api_keys") == [(key_id, None)]
    assert gw.query("SELECT sync_state FROM requests") == [("failed",)]
    ask(gw, key)  # the key still works


def test_create_and_revoke_a_key_from_the_dashboard(gateway: Gateway) -> None:
    with signed_in(gateway) as client:
        page = client.get("/admin/users/bob")
        assert page.status_code == 200 and "No keys." in page.text
        created = client.post("/admin/users/bob/keys", data={"csrf": csrf_of(page.text), "name": "laptop"})
        assert created.status_code == 201
        key = re.search(r'id="new-key">.*<code>(pgw_[^<]+)</code>', created.text)
        assert key, created.text
        ask(gateway, key.group(1))
        [(key_id, name, revoked)] = gateway.query("SELECT id, name, revoked_at FROM api_keys WHERE user_id = 'bob'")
        assert (name, revoked) == ("laptop", None)
        page = client.get("/admin/users/bob")
        assert key.group(1) not in page.text  # shown once
        resp = client.post(f"/admin/users/bob/keys/{key_id}/revoke", data={"csrf": csrf_of(page.text)})
        assert resp.status_code == 303 and resp.headers["location"] == f"/admin/users/bob?revoked={key_id}"
        with pytest.raises(anthropic.AuthenticationError):
            ask(gateway, key.group(1))
        page = client.get(resp.headers["location"])
        assert f"Key {key_id} revoked." in page.text and ">Revoke<" not in page.text
        # a key of another user, or an unknown one, is not revoked through this user
        other = gateway.issue_key("carol")
        carol_key = gateway.query("SELECT id FROM api_keys WHERE user_id = 'carol'")[0][0]
        resp = client.post(f"/admin/users/bob/keys/{carol_key}/revoke", data={"csrf": csrf_of(page.text)})
        assert resp.status_code == 404
        ask(gateway, other)
        bad = client.post("/admin/users/bad%20id/keys", data={"csrf": csrf_of(page.text)})
        assert bad.status_code == 400 and "invalid user id" in bad.text
        assert client.get("/admin/users/bad%20id").status_code == 404


def test_requeued_failed_events_reach_polar_at_once(make_gateway: Callable[..., Gateway], polar: FakePolar) -> None:
    # the sync runs when events land (a batch of one) and otherwise not for an hour: the re-queue wakes it
    gw = make_gateway(
        polar_access_token=polar.token,
        polar_base_url=polar.url,
        sync_max_attempts=1,
        sync_interval_seconds=3600,
        sync_batch_size=1,
    )
    key = gw.issue_key("dana")
    polar.reject_when(lambda e: "customer dana is unknown")
    ask(gw, key)
    rid = gw.wait_recorded("dana")[0]["id"]
    wait_until(lambda: gw.query("SELECT sync_state FROM requests") == [("failed",)], timeout=10)
    with signed_in(gw) as client:
        page = client.get("/admin/sync")
        assert f"{rid}:claude_input_tokens" in page.text and f"{rid}:claude_output_tokens" in page.text
        assert "customer dana is unknown" in page.text
        polar.reject_when(None)
        resp = client.post("/admin/sync/requeue", data={"csrf": csrf_of(page.text)})
        assert resp.status_code == 303 and resp.headers["location"] == "/admin/sync?requeued=2"
        wait_until(lambda: len(polar.events) == 2, timeout=10)
        assert polar.total("claude_input_tokens", "dana") == 12 and polar.total("claude_output_tokens", "dana") == 9
        wait_until(lambda: gw.query("SELECT sync_state FROM requests") == [("synced",)], timeout=10)
        page = client.get("/admin/sync?requeued=2")
        assert "Re-queued 2 events." in page.text and "No failed events." in page.text
        assert 'id="requeue"' not in page.text
        overview = client.get("/admin")
        assert re.search(r'id="polar-state">Polar <span class="pill ok">ok</span>', overview.text)
        assert "Last successful sync <b>never" not in overview.text


def test_pages_show_usage_requests_and_totals(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(plan={"claude_output_tokens": 20, "claude_input_tokens": 1000})
    key = gw.issue_key("erin")
    ask(gw, key, max_tokens=9)
    ask(gw, key, max_tokens=9)
    rows = gw.wait_recorded("erin", 2)
    with signed_in(gw) as client:
        user = client.get("/admin/users/erin").text
        meter = re.search(r'id="meter-claude_output_tokens" data-status="(\w+)" data-consumed="(\d+)"', user)
        assert meter and meter.groups() == ("critical", "18")  # 18 of 20
        assert re.search(r'id="meter-claude_input_tokens" data-status="ok" data-consumed="24"', user)
        assert 'style="width: 90.0%"' in user
        for r in rows:
            assert f"<code>{r['id']}</code>" in user
        assert user.count("claude_input_tokens 12, claude_output_tokens 9") == 2
        assert 'id="overall">critical<' in user
        overview = client.get("/admin").text
        totals = re.search(
            r'id="totals-24h">.*?<td>ok</td><td class="num">(\d+)</td><td class="num">(\d+)</td>', overview, re.S
        )
        assert totals and totals.groups() == ("2", "42")
        assert 'class="pill off">off<' in overview  # no Polar configured
        assert overview.count('<rect class="ok"') == 2  # one bar per chart of requests (hourly, daily)
        users = client.get("/admin/users?q=ri").text
        assert '<a href="/admin/users/erin">erin</a>' in users
        assert 'id="open-user"' in client.get("/admin/users?q=frank").text


def test_dashboard_without_an_admin_token_is_off(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway(admin_token="")
    assert httpx.get(f"{gw.url}/admin/signin").status_code == 503
    resp = httpx.post(f"{gw.url}/admin/signin", data={"token": ""})
    assert resp.status_code == 503 and "set-cookie" not in resp.headers
    assert httpx.get(f"{gw.url}/admin").headers["location"] == "/admin/signin"


async def test_the_session_cookie_is_secure_over_https(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/gw.db", journal_dir=str(tmp_path), admin_token=ADMIN_TOKEN)
    app = create_app(settings)  # (signing in touches no store: no lifespan needed)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://gw.example") as client:
        resp = await client.post("/admin/signin", data={"token": ADMIN_TOKEN})
    assert resp.status_code == 303
    assert "Secure" in [a.strip() for a in resp.headers["set-cookie"].split(";")]


def _cookie_attrs(resp: httpx.Response) -> list[str]:
    return [a.strip() for a in resp.headers["set-cookie"].split(";")]


@pytest.mark.parametrize(
    ("headers", "secure"),
    [
        ({"x-forwarded-proto": "https"}, True),  # a TLS-terminating load balancer (ALB, Traefik, Caddy, nginx)
        ({"x-forwarded-proto": "https, http"}, True),  # the first proxy's: what the browser used
        ({"forwarded": 'for=203.0.113.7;proto=https, for="[2001:db8::1]"'}, True),  # RFC 7239
        ({"x-forwarded-proto": "http"}, False),
        ({}, False),
    ],
)
async def test_the_session_cookie_is_secure_behind_a_tls_proxy(
    tmp_path: Path, headers: dict[str, str], secure: bool
) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/gw.db", journal_dir=str(tmp_path), admin_token=ADMIN_TOKEN)
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.internal") as client:
        signin = await client.post("/admin/signin", data={"token": ADMIN_TOKEN}, headers=headers)
        assert signin.status_code == 303
        assert ("Secure" in _cookie_attrs(signin)) is secure
        cookie = _cookie_attrs(signin)[0]
        signed = SessionSigner(ADMIN_TOKEN).verify(cookie.removeprefix("gw_admin="))
        assert signed is not None
        client.cookies.clear()  # (sent by hand: a client's jar keeps no Secure cookie from http)
        session = {"cookie": cookie}
        out = await client.post("/admin/signout", data={"csrf": signed.csrf}, headers={**headers, **session})
    assert out.status_code == 303 and "Max-Age=0" in _cookie_attrs(out)
    assert ("Secure" in _cookie_attrs(out)) is secure  # the cookie is cleared as it was set


async def test_gateway_secure_cookie_makes_the_session_cookie_secure_without_a_header(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/gw.db"
    settings = Settings(database_url=db, journal_dir=str(tmp_path), admin_token=ADMIN_TOKEN, secure_cookie=True)
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.internal") as client:
        resp = await client.post("/admin/signin", data={"token": ADMIN_TOKEN})
    assert resp.status_code == 303 and "Secure" in _cookie_attrs(resp)
    assert settings_from_env({"GATEWAY_SECURE_COOKIE": "1", "GATEWAY_CONFIG": CONFIG}).secure_cookie is True


def test_overview_says_when_polar_refuses_the_token_or_is_down(
    make_gateway: Callable[..., Gateway], polar: FakePolar
) -> None:
    refused = make_gateway(polar_access_token="polar_oat_WRONG", polar_base_url=polar.url)
    with signed_in(refused) as client:
        assert 'class="pill refused">refused<' in client.get("/admin").text
    polar.down(True)
    down = make_gateway(polar_access_token=polar.token, polar_base_url=polar.url)
    with signed_in(down) as client:
        page = client.get("/admin").text
        assert 'class="pill unreachable">unreachable<' in page
        assert polar.token not in page


def test_a_dashboard_session_opens_the_healthbar_demo(gateway: Gateway) -> None:
    user_key = gateway.issue_key("ivy")
    url = f"{gateway.url}/admin/healthbar-demo?user_id=ivy"
    with signed_in(gateway) as client:
        assert 'href="/admin/healthbar-demo?user_id=ivy"' in client.get("/admin/users/ivy").text
        resp = client.get(url)
        assert resp.status_code == 200 and "<gateway-healthbar" in resp.text
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": f"Bearer {user_key}"}).status_code == 401
    assert httpx.get(url, cookies={"gw_admin": user_key}).status_code == 401
    with gateway.admin() as admin:  # the admin API's token still opens it
        assert admin.get(url).status_code == 200
