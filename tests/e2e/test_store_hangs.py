"""A database that stops answering (a partition, a failover: nothing closes, nothing answers) must not
hold requests: what needs it (a request, the usage status, the admin API, the dashboard) is refused with a
503 (in the provider's shape on the provider routes) after GATEWAY_STORE_TIMEOUT_SECONDS, what the process
holds in memory is still served, and once the database answers again everything given up on is given
back and requests are served as before."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import anthropic
import httpx
import pytest

from gateway.meters import CLAUDE_OUTPUT
from tests.conftest import Gateway, wait_until
from tests.fakes.link import FreezableLink
from tests.fakes.polar import FakePolar, new_standard_secret, sign_webhook, webhook_payload
from tests.fakes.upstream import FakeUpstream
from tests.support_dashboard import csrf_of, signed_in
from tests.support_db import Databases

MSG = [{"role": "user", "content": "Hello"}]
TIMEOUT = 1.0
SILENT = {"error": {"type": "unavailable", "message": "the gateway's database did not answer within 1 s; retry later"}}


@pytest.fixture
def link(databases: Databases) -> Iterator[tuple[FreezableLink, str]]:
    """A PostgreSQL database reached through a link the test can freeze, and its URL over the link."""
    url = databases.new("hang", backend="postgres").url
    parts = urlsplit(url)
    relay = FreezableLink(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    try:
        yield relay, urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}"))
    finally:
        relay.stop()


def ask(gw: Gateway, key: str, max_tokens: int = 16) -> anthropic.types.Message:
    client = anthropic.Anthropic(base_url=f"{gw.url}/anthropic", api_key=key, max_retries=0, timeout=30)
    return client.messages.create(model="claude-sonnet-4-6", max_tokens=max_tokens, messages=MSG)  # type: ignore[arg-type]


def test_a_database_that_stops_answering_gets_a_503_in_bounded_time(
    link: tuple[FreezableLink, str], make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    relay, url = link
    gw = make_gateway(plan={CLAUDE_OUTPUT: 100_000}, shared=True, database_url=url, store_timeout_seconds=TIMEOUT)
    ann, bob = gw.issue_key("ann"), gw.issue_key("bob")
    assert ask(gw, ann).usage.output_tokens == 9
    served = len(upstream.requests)
    relay.freeze()
    try:
        # ann's key was looked up a moment ago (cached for 1 s): her request needs the store for its
        # reservation (more than any lease the first request took); bob's key is not in the cache.
        for key, needs in ((ann, ("keys", "the quota")), (bob, ("keys",))):
            started = time.monotonic()
            with pytest.raises(anthropic.APIStatusError) as refused:
                ask(gw, key, max_tokens=90_000)
            waited = time.monotonic() - started
            assert refused.value.status_code == 503
            assert refused.value.response.headers["retry-after"] == "1"
            body = refused.value.response.json()
            assert body["type"] == "error" and body["error"]["type"] == "api_error"
            messages = [f"the gateway cannot check {what} right now; retry in 1 s" for what in needs]
            assert body["error"]["message"] in messages
            assert TIMEOUT <= waited < TIMEOUT + 3
        assert len(upstream.requests) == served  # the provider was never asked
        started = time.monotonic()
        status = httpx.get(f"{gw.url}/api/billing/status", headers={"x-api-key": ann}, timeout=30)
        assert (status.status_code, status.headers["retry-after"]) == (503, "1")
        assert status.json() == SILENT
        assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 3
    finally:
        relay.thaw()
    # The database answers again: everything given up on was given back, so the whole credit is there.
    reply = ask(gw, ann, max_tokens=90_000)
    assert reply.usage.output_tokens == 9
    assert ask(gw, bob).usage.output_tokens == 9


def status_of(gw: Gateway, key: str) -> int:
    return httpx.get(f"{gw.url}/api/billing/status", headers={"x-api-key": key}, timeout=30).status_code


def test_the_admin_api_answers_a_503_in_bounded_time_while_the_database_is_silent(
    link: tuple[FreezableLink, str], make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    relay, url = link
    gw = make_gateway(shared=True, database_url=url, store_timeout_seconds=TIMEOUT)
    ann = gw.issue_key("ann")
    with gw.admin() as admin:
        (ann_id,) = [k["id"] for k in admin.get("/admin/keys", params={"user_id": "ann"}).json()["data"]]
        caplog.set_level(logging.WARNING, logger="gateway.api")
        relay.freeze()
        try:
            calls = (
                ("POST", "/admin/keys", {"user_id": "bob", "name": "unseen"}),
                ("GET", "/admin/keys", None),
                ("DELETE", f"/admin/keys/{ann_id}", None),
            )
            for method, path, body in calls:
                started = time.monotonic()
                resp = admin.request(method, path, json=body, timeout=30)
                waited = time.monotonic() - started
                assert (resp.status_code, resp.json()) == (503, SILENT), f"{method} {path}: {resp.text}"
                assert resp.headers["retry-after"] == "1"
                assert TIMEOUT <= waited < TIMEOUT + 0.5, f"{method} {path} took {waited:.2f} s"
        finally:
            relay.thaw()
        # one warning line each, naming no DSN
        lines = [r.getMessage() for r in caplog.records if r.name == "gateway.api"]
        assert len(lines) == 3 and all("admin API" in line and url not in line for line in lines), lines
        # The database answers again: the revocation given up on was made after all (a late revocation
        # is refused here at once), and the admin API works as before.
        wait_until(lambda: admin.get("/admin/keys", params={"user_id": "ann"}).json()["data"][0]["revoked_at"], 10)
        assert status_of(gw, ann) == 401
        created = admin.post("/admin/keys", json={"user_id": "carol"})
        assert created.status_code == 201, created.text
        carol = created.json()
        assert status_of(gw, carol["key"]) == 200
        assert admin.delete(f"/admin/keys/{carol['id']}").json() == {"id": carol["id"], "revoked": True}
        assert status_of(gw, carol["key"]) == 401
        # Bob's key, if stored after its 503, was never shown: listed like any other, but nobody holds it.
        assert all(k["name"] == "unseen" for k in admin.get("/admin/keys", params={"user_id": "bob"}).json()["data"])


def test_a_dashboard_action_answers_a_503_page_in_bounded_time_while_the_database_is_silent(
    link: tuple[FreezableLink, str], make_gateway: Callable[..., Gateway]
) -> None:
    relay, url = link
    gw = make_gateway(shared=True, database_url=url, store_timeout_seconds=TIMEOUT)
    with signed_in(gw) as client:
        csrf = csrf_of(client.get("/admin/users/dora").text)
        relay.freeze()
        try:
            for path in ("/admin/users/dora/keys", "/admin/sync/requeue"):
                started = time.monotonic()
                resp = client.post(path, data={"csrf": csrf, "name": "web"}, timeout=30)
                waited = time.monotonic() - started
                assert resp.status_code == 503, resp.text
                assert "<h1>Database unavailable</h1>" in resp.text
                assert f"the gateway&#39;s database did not answer within {TIMEOUT:g} s" in resp.text
                assert resp.headers["cache-control"] == "no-store"  # the dashboard's own headers
                assert TIMEOUT <= waited < TIMEOUT + 0.5, f"{path} took {waited:.2f} s"
            started = time.monotonic()
            assert client.get("/admin").status_code == 503  # a page reading the store too
            assert time.monotonic() - started < TIMEOUT + 0.5
        finally:
            relay.thaw()
        created = client.post("/admin/users/dora/keys", data={"csrf": csrf, "name": "web"})
        assert created.status_code == 201 and "pgw_" in created.text


def test_a_webhook_the_database_does_not_take_gets_a_503_and_is_applied_once(
    link: tuple[FreezableLink, str], make_gateway: Callable[..., Gateway]
) -> None:
    relay, url = link
    secret = new_standard_secret()
    with FakePolar() as polar:
        gw = make_gateway(
            plan={CLAUDE_OUTPUT: 10},
            shared=True,
            database_url=url,
            store_timeout_seconds=TIMEOUT,
            polar_access_token=polar.token,
            polar_base_url=polar.url,
            polar_webhook_secret=secret,
        )
        key = gw.issue_key("carol")
        assert ask(gw, key, max_tokens=9).usage.output_tokens == 9
        gw.wait_recorded("carol")
        with pytest.raises(anthropic.PaymentRequiredError):
            ask(gw, key, max_tokens=9)
        polar.set_state("carol", meters={CLAUDE_OUTPUT: (1000, 9.0)})
        body, headers = sign_webhook(
            webhook_payload("customer.state_changed", polar.state_payload("carol")), secret, legacy=False
        )
        relay.freeze()
        try:
            started = time.monotonic()
            resp = httpx.post(f"{gw.url}/webhooks/polar", content=body, headers=headers, timeout=30)
            assert resp.status_code == 503
            assert resp.json()["error"]["type"] == "unavailable"
            assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 3
        finally:
            relay.thaw()
        # The delivery went on once the database answered; Polar's retry finds it applied.
        again = wait_until(
            lambda: (
                (r := httpx.post(f"{gw.url}/webhooks/polar", content=body, headers=headers)).status_code == 200
                and r.json()
            )
        )
        assert again == {"status": "duplicate"}
        assert ask(gw, key, max_tokens=9).usage.output_tokens == 9  # the 402 is lifted


def test_metrics_are_scraped_while_the_database_does_not_answer(
    link: tuple[FreezableLink, str], make_gateway: Callable[..., Gateway]
) -> None:
    relay, url = link
    gw = make_gateway(shared=True, database_url=url, store_timeout_seconds=TIMEOUT, metrics="open")
    assert "gateway_sync_backlog_requests" in httpx.get(f"{gw.url}/metrics", timeout=30).text
    relay.freeze()
    try:
        started = time.monotonic()
        scraped = httpx.get(f"{gw.url}/metrics", timeout=30)
        assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 3
    finally:
        relay.thaw()
    # Everything but the backlog (read from the database), and the failed read counted.
    assert scraped.status_code == 200
    assert "gateway_sync_backlog_requests" not in scraped.text
    assert 'gateway_store_errors_total{operation="sync_backlog"} 1.0' in scraped.text
